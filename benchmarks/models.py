"""Every registered network on the shipped sample data, each trained for the same CPU time (run on demand).

    .venv/bin/python benchmarks/models.py [--budget-3d 150] [--budget-2d 90] [--only NAME ...]
    .venv-torchvision/bin/python benchmarks/models.py --only smp deeplabv3   # the torchvision networks

For each network: a calibration run (two short epochs; the second gives seconds per iteration), then a run of as
many 20-iteration epochs as fit the budget (so each network completes its learning-rate schedule within the same
CPU time), validated once at the end; then ``medseg predict`` on the four sample *test* cases and their Dice against
the shipped labels. Same recipe for every network of a dimension (3D: the demo preset at 1.5 x 1.5 x 3 mm with
64 x 64 x 32 patches, a patch SwinUNETR can take; 2D: the lesion2d_segformer recipe, AdamW, at 128 x 128), each
network at a CPU size. Reported per network: test Dice per label, training iterations/s (training epochs only),
prediction seconds per case (the network part, from the manifest), parameters, and peak training memory per
voxel relative to the UNet of the same dimension (``memory_factor``, what the planner reads: VmHWM of a fresh
process over 3 training steps, minus that of the same process before the first step).

Results merge into ``benchmarks/results/models.json`` by network, with the torch build each ran under.
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
from _common import RESULTS, machine

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 20
COMMON = {
    "ct3d": ("demo", ["data.spacing=[1.5, 1.5, 3.0]", "data.patch_size=[64, 64, 32]", "train.batch_size=2", "tracking.log_model=false"]),
    "derm2d": ("lesion2d_segformer", ["data.spacing=[1.0, 1.0]", "data.patch_size=[128, 128]", "train.batch_size=4",
                                      "model.size=null", "tracking.log_model=false"]),
}
NETWORKS = {  # name (key) -> (dataset, --set overrides): CPU-sized members of each family
    "unet_3d": ("ct3d", ["model.name=unet", "model.channels=[16, 32, 64, 128]", "model.strides=[2, 2, 2]"]),
    "dynunet_3d": ("ct3d", ["model.name=dynunet", "model.channels=[16, 32, 64, 128]", "model.strides=[2, 2, 2]"]),
    "segresnet_3d": ("ct3d", ["model.name=segresnet", "model.channels=[16, 32, 64, 128]", "model.strides=[2, 2, 2]"]),
    "resenc_unet_3d": ("ct3d", ["model.name=resenc_unet", "model.size=cpu", "model.channels=[16, 32, 64, 128]",
                                "model.strides=[2, 2, 2]"]),
    "swinunetr_3d": ("ct3d", ["model.name=swinunetr", "model.channels=[12, 24, 48, 96, 192, 384]",
                              "model.strides=[2, 2, 2, 2, 2]"]),
    "unet_2d": ("derm2d", ["model.name=unet", "model.channels=[16, 32, 64, 128, 256]", "model.strides=[2, 2, 2, 2]"]),
    "unetpp_2d": ("derm2d", ["model.name=unetpp", "model.channels=[16, 32, 64, 128, 256]", "model.strides=[2, 2, 2, 2]"]),
    "segformer_2d": ("derm2d", ["model.name=segformer", "model.size=b0", "model.channels=[4, 4, 4, 4, 4, 4]",
                                "model.strides=[2, 2, 2, 2, 2]"]),
    "smp_2d": ("derm2d", ["model.name=smp", "model.arch=Unet", "model.encoder=resnet18", "model.channels=[4, 4, 4, 4, 4, 4]",
                          "model.strides=[2, 2, 2, 2, 2]"]),
    "deeplabv3_2d": ("derm2d", ["model.name=deeplabv3", "model.encoder=mobilenet_v3_large",
                                "model.channels=[4, 4, 4, 4, 4]", "model.strides=[2, 2, 2, 2]"]),
}
ENV = {**os.environ, "MEDSEG_THREADS": str(os.cpu_count())}


def _train(key: str, run: Path, extra: list[str]) -> list[dict]:
    dataset, sets = NETWORKS[key]
    preset, common = COMMON[dataset]
    args = [f"data.dataset={ROOT / 'sample_data' / dataset}", *common, *sets, *extra]
    cmd = [sys.executable, "-m", "medseg", "-q", "train", "-c", preset, "-o", str(run), *[a for s in args for a in ("--set", s)]]
    subprocess.run(cmd, check=True, env={**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{run.parent / 'mlflow.db'}"},
                   stdout=subprocess.DEVNULL)
    return json.loads((run / "history.json").read_text())


MEMORY_PROBE = r"""
import json, sys, torch
from medseg.config import load_config
from medseg.models import build_model
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
preset, sets, dims, channels, classes, batch, patch = json.loads(sys.argv[1])
cfg = load_config(preset, sets)
net = build_model(cfg.model, dims, channels, classes).train()
opt = torch.optim.SGD(net.parameters(), lr=1e-3)
x = torch.randn(batch, channels, *patch)
y = torch.randint(0, classes, (batch, *patch))
before = hwm()
for _ in range(3):
    out = net(x)
    out = out[-1] if isinstance(out, (list, tuple)) else out
    torch.nn.functional.cross_entropy(out, y).backward()
    opt.step(); opt.zero_grad(set_to_none=True)
print(hwm() - before)
"""


def _memory(key: str) -> int:
    """Peak training memory (bytes) of 3 steps in a fresh process, above the process before the first step."""
    dataset, sets = NETWORKS[key]
    preset, common = COMMON[dataset]
    dims, channels, classes = (3, 1, 3) if dataset == "ct3d" else (2, 3, 2)
    patch, batch = ([64, 64, 32], 2) if dims == 3 else ([128, 128], 4)
    spec = json.dumps([preset, [*common, *sets], dims, channels, classes, batch, patch])
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, spec], check=True, capture_output=True, text=True, env=ENV)
    return int(out.stdout.strip().splitlines()[-1])


def run_one(key: str, budget_s: float, work: Path) -> dict:
    dataset = NETWORKS[key][0]
    data = ROOT / "sample_data" / dataset
    calibration = _train(key, work / f"{key}_calibrate", ["train.epochs=2", "train.iterations_per_epoch=5", "train.val_every=100"])
    s_per_it = calibration[-1]["epoch_time_s"] / 5
    epochs = max(2, round(budget_s / (ITERATIONS * s_per_it)))
    run = work / key
    start = time.perf_counter()
    history = _train(key, run, [f"train.epochs={epochs}", f"train.iterations_per_epoch={ITERATIONS}", f"train.val_every={epochs}",
                                "train.warmup_epochs=0"])
    wall = time.perf_counter() - start
    train_s = sum(h["epoch_time_s"] for h in history)
    pred = work / f"{key}_pred"
    subprocess.run([sys.executable, "-m", "medseg", "-q", "predict", "-i", str(data / "imagesTs"), "-o", str(pred),
                    "-m", str(run / "model")], check=True, env=ENV, stdout=subprocess.DEVNULL)
    manifest = json.loads((pred / "manifest.json").read_text())
    predict_s = [c["timings"]["predict_s"] for c in manifest["cases"]]
    from medseg.io.dataset import load_dataset
    from medseg.metrics.evaluate import evaluate_folders

    labels = {k: v for k, v in load_dataset(data).labels.items() if k != 0}
    summary = evaluate_folders(pred, data / "labelsTs", work / f"{key}_eval", labels=labels)
    import torch

    weights = torch.load(run / "model" / "weights.pt", map_location="cpu", weights_only=True)
    return {
        "dataset": f"sample_data/{dataset}", "overrides": NETWORKS[key][1],
        "parameters": int(sum(v.numel() for k, v in weights.items() if v.is_floating_point() and "running_" not in k)),
        "budget_s": budget_s, "epochs": epochs, "iterations": epochs * ITERATIONS,
        "train_epochs_s": round(train_s, 1), "train_wall_s": round(wall, 1),
        "train_it_per_s": round(epochs * ITERATIONS / train_s, 3),
        "predict_s_per_case": round(sum(predict_s) / len(predict_s), 3),
        "test_dice": {name: round(summary[name]["dice"]["mean"], 4) for name in labels.values()},
        "test_dice_mean": round(sum(summary[name]["dice"]["mean"] for name in labels.values()) / len(labels), 4),
        "peak_train_memory_mb": round(_memory(key) / 2**20, 1),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-3d", type=float, default=150.0, help="training seconds per 3D network")
    parser.add_argument("--budget-2d", type=float, default=90.0, help="training seconds per 2D network")
    parser.add_argument("--only", nargs="*", default=None, help="network names (unet, smp, ...) to run")
    args = parser.parse_args()
    from medseg.models.registry import missing_package

    keys = [k for k in NETWORKS if args.only is None or k.rsplit("_", 1)[0] in args.only]
    path = RESULTS / "models.json"
    results = json.loads(path.read_text()) if path.is_file() else {"networks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            missing = missing_package(key.rsplit("_", 1)[0])
            if missing:
                print(f"{key}: skipped, {missing} does not import here (run it with .venv-torchvision/bin/python)")
                continue
            budget = args.budget_3d if NETWORKS[key][0] == "ct3d" else args.budget_2d
            results["networks"][key] = run_one(key, budget, Path(tmp))
            print(key, json.dumps(results["networks"][key]), flush=True)
            _save(results, path)  # after every network: a later failure keeps what was measured


def _save(results: dict, path: Path) -> None:
    for dims in ("3d", "2d"):  # memory per voxel relative to the UNet of the same dimension, where both ran
        ref = results["networks"].get(f"unet_{dims}", {}).get("peak_train_memory_mb")
        for key, entry in results["networks"].items():
            if key.endswith(dims) and ref:
                entry["memory_factor_vs_unet"] = round(entry["peak_train_memory_mb"] / ref, 2)
    results["machine"] = machine()
    results["method"] = __doc__.split("\n\n")[2].strip()
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
