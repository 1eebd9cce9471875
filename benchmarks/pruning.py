"""What structured pruning (``medseg prune``) costs and gains, on the shipped 3D sample data with the organ3d_unet
preset (its planned UNet), each pruned model against the unpruned one measured in the same run.

    .venv/bin/python benchmarks/pruning.py [--epochs 16] [--iterations 20] [--finetune-epochs 4]

1. ``medseg train`` the unpruned model (short: the comparison, not the absolute Dice, is the point);
2. for R = 0.25 and 0.5: ``medseg prune --ratio R`` with distillation fine-tuning (``--finetune-epochs``);
3. on the run's validation cases: mean foreground Dice of the unpruned, the pruned (before fine-tuning) and the
   fine-tuned model, the same Predictor path (sliding window, no TTA, QC off) for all;
4. CPU prediction time (median of 3 after a warm-up) of one test volume (101 x 95 x 18: reading-size overheads
   dominate) and of that volume tiled to 3 x 3 x 4 (303 x 285 x 72: the network dominates), parameters and weights
   file size; speed-up = unpruned time / pruned time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_time, save

from medseg.cli import app
from medseg.inference.predictor import Predictor
from medseg.io.readers import read_volume
from medseg.io.volume import Volume
from medseg.models.folder import ModelFolder

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "ct3d"


def _cli(*args: str) -> None:
    result = CliRunner().invoke(app, ["-q", *args])
    if result.exit_code != 0:
        raise SystemExit(f"medseg {' '.join(args)} failed: {result.output} {result.exception!r}")


def _dice(model_dir: Path, cases: list[str]) -> float:
    """Mean Dice over the foreground labels and the cases (an empty pair counts 1)."""
    predictor = Predictor.from_model_dir(model_dir, "cpu", tta=False)
    labels = ModelFolder.read(model_dir).labels
    scores = []
    for case in cases:
        image = read_volume(DATA / "imagesTr" / f"{case}.nii.gz")
        ref = np.asarray(read_volume(DATA / "labelsTr" / f"{case}.nii.gz").array[0])
        got = predictor.predict_case(image, qc=False).labels.array[0]
        for k in labels:
            if k == 0:
                continue
            a, b = got == k, ref == k
            total = a.sum() + b.sum()
            scores.append(1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total)
    return float(np.mean(scores))


def _speed(model_dir: Path, image) -> float:
    predictor = Predictor.from_model_dir(model_dir, "cpu", tta=False)
    return median_time(lambda: predictor.predict_case(image, qc=False), 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    args = parser.parse_args()
    common = [f"train.iterations_per_epoch={args.iterations}", "train.val_every=1", "data.num_workers=0",
              "train.device=cpu", "inference.tta=false"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        import os

        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        start = time.perf_counter()
        _cli("train", "-c", "organ3d_unet", "-o", str(root / "base"), "--set", f"data.dataset={DATA}",
             "--set", f"train.epochs={args.epochs}", *[x for s in common for x in ("--set", s)])
        train_s = time.perf_counter() - start
        base = root / "base" / "model"
        val = json.loads((root / "base" / "splits.json").read_text())["val"]
        image = read_volume(sorted((DATA / "imagesTs").iterdir())[0])
        large = Volume(np.tile(np.asarray(image.array), (1, 3, 3, 4)), image.affine)
        unpruned = {"dice": _dice(base, val), "predict_s": _speed(base, image), "predict_large_s": _speed(base, large),
                    "parameters": None, "weights_bytes": (base / "weights.pt").stat().st_size,
                    "channels": list(ModelFolder.read(base).config.model.channels or ())}
        rows = []
        for ratio in (0.25, 0.5):
            run = root / f"pruned_{ratio}"
            start = time.perf_counter()
            _cli("prune", "-m", str(base), "--ratio", str(ratio), "-o", str(run), "--dataset", str(DATA),
                 "--epochs", str(args.finetune_epochs), *[x for s in common for x in ("--set", s)])
            prune_s = time.perf_counter() - start
            record = ModelFolder.read(run / "model").info["pruning"]
            unpruned["parameters"] = record["parameters_before"]
            tuned = {"dice": _dice(run / "model", val), "predict_s": _speed(run / "model", image),
                     "predict_large_s": _speed(run / "model", large)}
            rows.append({
                "ratio": ratio, "channels": list(ModelFolder.read(run / "model").config.model.channels or ()),
                "parameters": record["parameters_after"], "weights_bytes": (run / "model" / "weights.pt").stat().st_size,
                "dice_pruned_before_finetune": _dice(run / "pruned", val), "dice_finetuned": tuned["dice"],
                "dice_change_vs_unpruned": tuned["dice"] - unpruned["dice"], "predict_s": tuned["predict_s"],
                "cpu_speedup_vs_unpruned": unpruned["predict_s"] / tuned["predict_s"],
                "predict_large_s": tuned["predict_large_s"],
                "cpu_speedup_large_vs_unpruned": unpruned["predict_large_s"] / tuned["predict_large_s"],
                "prune_and_finetune_s": prune_s,
            })
    save("pruning", {
        "setup": {"data": "sample_data/ct3d", "preset": "organ3d_unet", "epochs": args.epochs,
                  "iterations_per_epoch": args.iterations, "finetune": "distill", "finetune_epochs": args.finetune_epochs,
                  "validation_cases": len(val), "timed_volume": list(image.spatial_shape),
                  "timed_large_volume": list(large.spatial_shape), "train_s": train_s},
        "unpruned": unpruned, "pruned": rows,
    })


if __name__ == "__main__":
    main()
