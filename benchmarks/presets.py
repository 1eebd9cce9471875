"""Train a preset on the shipped sample data and evaluate it on the sample *test* cases (run on demand).

    .venv/bin/python benchmarks/presets.py organ3d_unet ct3d [--set train.epochs=30 ...] [--run RUN_DIR]
    .venv/bin/python benchmarks/presets.py lesion2d_unetpp derm2d --run RUN_DIR --existing

Writes/updates benchmarks/results/presets.json with the test Dice per label, the wall time of training, the
overrides used and the machine. With --existing, evaluates a run trained earlier with the same preset
(training time then comes from its history: the sum of epoch times, validation excluded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("preset")
    parser.add_argument("dataset", choices=["ct3d", "derm2d"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--existing", action="store_true")
    args = parser.parse_args()
    data = ROOT / "sample_data" / args.dataset
    run = args.run or Path(tempfile.mkdtemp()) / args.preset
    if args.existing:
        history = json.loads((run / "history.json").read_text())
        train_s, how = sum(h["epoch_time_s"] for h in history), "sum of epoch times from history.json (validation excluded)"
        overrides = args.overrides
    else:
        cmd = [sys.executable, "-m", "medseg", "-q", "train", "-c", args.preset, "--set", f"data.dataset={data}",
               *[a for o in args.overrides for a in ("--set", o)], "-o", str(run)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        train_s, how, overrides = time.perf_counter() - start, "wall time of `medseg train` (incl. validation report)", args.overrides
    pred = run / "test_predictions"
    subprocess.run([sys.executable, "-m", "medseg", "-q", "predict", "-i", str(data / "imagesTs"), "-o", str(pred),
                    "-m", str(run / "model"), "--overwrite"], check=True)
    from medseg.io.dataset import load_dataset
    from medseg.metrics.evaluate import evaluate_folders

    labels = {k: v for k, v in load_dataset(data).labels.items() if k != 0}
    summary = evaluate_folders(pred, data / "labelsTs", run / "test_evaluation", labels=labels)
    history = json.loads((run / "history.json").read_text())
    entry = {
        "preset": args.preset, "dataset": f"sample_data/{args.dataset}", "overrides": overrides,
        "epochs_run": len(history), "train_seconds": round(train_s, 1), "train_seconds_measured_as": how,
        "best_val_dice_mean": max((h.get("val_dice_mean", -1) for h in history), default=None),
        "test_cases": summary[next(iter(labels.values()))]["dice"]["n"] + summary[next(iter(labels.values()))]["dice"]["n_undefined"],
        "test_dice": {name: summary[name]["dice"]["mean"] for name in labels.values()},
        "test_dice_ci95": {name: [summary[name]["dice"]["ci_low"], summary[name]["dice"]["ci_high"]] for name in labels.values()},
        "test_hd95_mm": {name: summary[name]["hd95"]["mean"] for name in labels.values()},
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "presets.json"
    results = json.loads(path.read_text()) if path.is_file() else {"machine": machine(), "runs": {}}
    results["machine"] = machine()
    results["runs"][args.preset] = entry
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
