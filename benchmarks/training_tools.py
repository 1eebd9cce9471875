"""What the training tools of issue 29 cost, each against its peer measured in the same run, on the shipped 3D
sample data with the organ3d_unet preset (short runs: the ratios, not the Dice, are the point).

    .venv/bin/python benchmarks/training_tools.py [--epochs 2] [--iterations 10]

(a) ``medseg train``'s loop (fit) vs the same run under Lightning's Trainer (medseg.lightning): wall time, and the
    largest relative difference of the per-epoch losses (the same numbers are expected);
(b) fit with TensorBoard (scalars, a validation overlay per validation, the graph) vs without;
(c) ``medseg explain`` (Grad-CAM, every foreground label) vs ``medseg predict`` (predict_case, QC on) of the trained
    model on one test case, the same process and volume.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import save

from medseg.config import load_config
from medseg.inference.explain import Explainer
from medseg.inference.predictor import Predictor
from medseg.io.readers import read_volume
from medseg.tracking import TensorBoardTracker
from medseg.training.tracker import NullTracker, Trackers
from medseg.training.trainer import fit

ROOT = Path(__file__).resolve().parents[1]


def _timed(call):
    start = time.perf_counter()
    out = call()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()
    import lightning.pytorch as L

    from medseg.lightning import from_config, trainer_arguments

    data = ROOT / "sample_data" / "ct3d"
    cfg = load_config("organ3d_unet", [f"data.dataset={data}", f"train.epochs={args.epochs}",
                                       f"train.iterations_per_epoch={args.iterations}", "train.val_every=1",
                                       "data.num_workers=0", "train.device=cpu"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fit(cfg, root / "warm", show_progress=False)  # the cache directory differs per run: warm the OS and imports
        plain, fit_s = _timed(lambda: fit(cfg, root / "plain", show_progress=False))

        def lightning_run():
            module, datamodule = from_config(cfg, root / "lit")
            L.Trainer(**trainer_arguments(cfg), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False).fit(module, datamodule=datamodule)
            return module

        module, lightning_s = _timed(lightning_run)
        board = Trackers(NullTracker(), TensorBoardTracker(root / "tb"))
        _, board_s = _timed(lambda: fit(cfg, root / "board", board, show_progress=False))
        board.close()
        ours = np.array([h["train_loss"] for h in plain.history])
        theirs = np.array([h["train_loss"] for h in module.state.history])

        image = read_volume(sorted((data / "imagesTs").iterdir())[0])
        predictor = Predictor.from_model_dir(plain.model_dir, "cpu")
        explainer = Explainer.from_model_dir(plain.model_dir, "cpu")
        predictor.predict_case(image)  # warm-up
        _, predict_s = _timed(lambda: predictor.predict_case(image))
        explanation, explain_s = _timed(lambda: explainer.explain(image))
    results = {
        "preset": "organ3d_unet", "epochs": args.epochs, "iterations_per_epoch": args.iterations,
        "fit_s": round(fit_s, 2), "lightning_s": round(lightning_s, 2),
        "lightning_over_fit": round(lightning_s / fit_s, 3),
        "lightning_max_rel_loss_diff": float(np.max(np.abs(theirs - ours) / np.abs(ours))),
        "tensorboard_fit_s": round(board_s, 2), "tensorboard_over_fit": round(board_s / fit_s, 3),
        "case_shape": list(image.spatial_shape), "predict_s": round(predict_s, 2), "explain_s": round(explain_s, 2),
        "explain_labels": explanation.facts["labels"], "explain_layer": explanation.facts["layer"],
        "explain_over_predict": round(explain_s / predict_s, 2),
    }
    save("training_tools", results)



if __name__ == "__main__":
    main()
