"""A 5-fold ensemble against the one student distilled from it (run on demand, ~25 minutes on 2 cores).

    .venv/bin/python benchmarks/distill.py [--work DIR] [--student-channels 8,16,32,64]

1. Teachers: ``medseg train --folds 0-4 -c demo`` on ``sample_data/ct3d`` (the demo recipe per fold).
2. The ensemble as users run it: ``medseg predict`` with the five folds and ``--tta`` on the four sample test cases.
3. The student: ``medseg distill`` from the five folds, the demo recipe with a smaller network (``--student-channels``),
   predicted alone without TTA; and the same small network trained by ``medseg train`` without teachers (what
   distillation adds over training the small network directly).

Reported: test Dice per label and mean for each, prediction seconds per case (the network part from the manifest, and
the wall time of the predict command per case), and the ratios the goal is stated in: student Dice minus ensemble Dice
(goal >= -0.01) and ensemble time / student time (goal >= 5). Writes ``benchmarks/results/distill.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, save

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "ct3d"
ENV = {**os.environ, "MEDSEG_THREADS": str(os.cpu_count())}


def _medseg(*args: str, work: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medseg", "-q", *args], check=True, stdout=subprocess.DEVNULL,
                   env={**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"})
    return time.perf_counter() - start


def _predict(models: list[Path], out: Path, tta: bool, work: Path) -> dict:
    wall = _medseg("predict", "-i", str(DATA / "imagesTs"), "-o", str(out), *[a for m in models for a in ("-m", str(m))],
                   "--tta" if tta else "--no-tta", "--overwrite", work=work)
    from medseg.io.dataset import load_dataset
    from medseg.metrics.evaluate import evaluate_folders

    manifest = json.loads((out / "manifest.json").read_text())
    predict_s = [c["timings"]["predict_s"] for c in manifest["cases"]]
    labels = {k: v for k, v in load_dataset(DATA).labels.items() if k != 0}
    summary = evaluate_folders(out, DATA / "labelsTs", out.with_name(out.name + "_eval"), labels=labels)
    dice = {name: round(summary[name]["dice"]["mean"], 4) for name in labels.values()}
    return {"models": len(models), "tta": tta, "test_dice": dice, "test_dice_mean": round(sum(dice.values()) / len(dice), 4),
            "predict_s_per_case": round(sum(predict_s) / len(predict_s), 3), "wall_s_per_case": round(wall / len(predict_s), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--student-channels", default="8,16,32,64")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    data = f"data.dataset={DATA}"
    student = f"model.channels=[{args.student_channels}]"

    cv = work / "cv"
    times = {}
    if not (cv / "fold_4" / "model").is_dir():
        times["teachers_train_s"] = round(_medseg("train", "--folds", "0-4", "-c", "demo", "-o", str(cv), "--set", data, work=work), 1)
    folds = [cv / f"fold_{k}" / "model" for k in range(5)]
    ensemble = _predict(folds, work / "pred_ensemble_tta", True, work)
    ensemble_plain = _predict(folds, work / "pred_ensemble", False, work)

    tag = args.student_channels.replace(",", "-")
    distilled = work / f"student_{tag}"
    if not (distilled / "model").is_dir():
        times["distill_s"] = round(_medseg("distill", *[a for m in folds for a in ("-m", str(m))], "-c", "demo", "-o", str(distilled),
                                           "--set", data, "--set", student, work=work), 1)
    plain = work / f"small_plain_{tag}"
    if not (plain / "model").is_dir():
        times["small_plain_train_s"] = round(_medseg("train", "-c", "demo", "-o", str(plain), "--set", data, "--set", student, work=work), 1)
    student_result = _predict([distilled / "model"], work / f"pred_student_{tag}", False, work)
    plain_result = _predict([plain / "model"], work / f"pred_small_plain_{tag}", False, work)

    previous = json.loads((RESULTS / "distill.json").read_text()) if (RESULTS / "distill.json").is_file() else {}
    students = previous.get("students", {})
    students[args.student_channels] = {
        "recipe": f"`medseg distill` with the demo recipe and {student}; distill section defaults (T=2, weight 0.5)",
        "student": student_result,
        "same_network_without_distillation": plain_result,
        "student_minus_ensemble_dice": round(student_result["test_dice_mean"] - ensemble["test_dice_mean"], 4),
        "ensemble_over_student_time_network": round(ensemble["predict_s_per_case"] / student_result["predict_s_per_case"], 2),
        "ensemble_over_student_time_wall": round(ensemble["wall_s_per_case"] / student_result["wall_s_per_case"], 2),
        "times": times,
    }
    result = {
        "dataset": "sample_data/ct3d (4 test cases)",
        "teachers_recipe": "5 folds of `medseg train --folds 0-4 -c demo` (channels [16, 32, 64, 128])",
        "ensemble_tta": ensemble,
        "ensemble_no_tta": ensemble_plain,
        "students": students,
        "goal": "student Dice within 0.01 of the ensemble (with TTA) at >= 5x lower prediction time",
    }
    save("distill", result)


if __name__ == "__main__":
    main()
