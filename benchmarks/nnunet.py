"""medseg against nnU-Net's own predictor on one nnU-Net v2 results folder and a CT-sized input, in fresh processes.

The results folder is in nnU-Net's layout and checkpoint format (``tests/nnunet_helpers.py``: plans with a small
PlainConvUNet, so that on a CPU the comparison is about everything around the network - reading, cropping,
normalisation, order-3 resampling, stitching, resampling back, writing - which is what users wait for on a GPU).
The input: a 512 x 512 x Z int16 CT-like volume at 0.78 x 0.78 x 1.5 mm; the plans' spacing is 1.0 x 1.0 x 2.0 mm,
so both directions of resampling run.

Each round runs, in rotating order, each in a fresh process:

* ``nnunet``: ``nnUNetv2_predict_from_modelfolder -f 0 -device cpu -npp 1 -nps 1 --disable_tta``;
* ``medseg``: ``medseg predict -m RESULTS_FOLDER -d cpu --no-tta`` (nnU-Net's steps exactly, without mirroring);
* ``medseg_fast``: ``medseg predict -m RESULTS_FOLDER -d cpu --fast``;

(mirroring off for both, so that 8 network passes per window do not drown what is compared on a 2-core CPU;
``--tta`` turns it on for both.)

timing the wall clock and reading each process tree's peak RSS (``/usr/bin/time``'s maximum resident set size: the
largest single process of the tree). Ratios are medians of nnU-Net's figure over medseg's. medseg's manifest says
where its time went (read, nnU-Net preprocessing, resampling, network, resampling back, write), and
``non_network`` compares what surrounds the network (nnU-Net's share estimated with medseg's network seconds of the
same round). The labels of the three are compared (voxels equal, Dice per label against nnU-Net).

Needs nnunetv2 (``make test-torchvision``'s environment has it):

    .venv-torchvision/bin/python benchmarks/nnunet.py [--slices 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import nnunet_helpers as H  # noqa: E402
from _common import save  # noqa: E402

SPACING = (0.78, 0.78, 1.5)


def phantom(slices: int) -> np.ndarray:
    """A CT-like int16 volume, built a slab at a time (no float64 copy of the whole volume)."""
    rng = np.random.default_rng(0)
    out = np.empty((512, 512, slices), np.int16)
    x, y = np.meshgrid(np.linspace(-1, 1, 512), np.linspace(-1, 1, 512), indexing="ij")
    for k in range(slices):
        z = -1 + 2 * k / max(1, slices - 1)
        img = np.full((512, 512), -1000.0)
        img[x ** 2 / 0.8 + y ** 2 / 0.5 < 0.8] = 40
        img[(x - 0.2) ** 2 + y ** 2 + z ** 2 < 0.15] = 120
        img[(x + 0.3) ** 2 + (y - 0.2) ** 2 + (z + 0.2) ** 2 < 0.03] = 250
        out[..., k] = np.clip(img + rng.normal(0, 12, img.shape), -1024, 3000)
    return out


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``cmd`` in a fresh process (``/usr/bin/time -v``)."""
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return wall, int(rss.group(1)) / 1024 if rss else float("nan")


def dice(a: np.ndarray, b: np.ndarray, k: int) -> float:
    x, y = a == k, b == k
    return 1.0 if not x.any() and not y.any() else 2 * float((x & y).sum()) / float(x.sum() + y.sum())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tta", action="store_true", help="mirroring on for nnU-Net and medseg (nnU-Net's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/gpu.sh)")
    parser.add_argument("--name", default="nnunet", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="nnunet_bench_"))
    try:
        plans = H.plans(patch=(32, 96, 96), spacing=(2.0, 1.0, 1.0))
        folder = H.write_results_folder(work, folds=(0,), p=plans)
        inputs = work / "in"
        inputs.mkdir()
        nib.save(nib.Nifti1Image(phantom(args.slices), np.diag([*SPACING, 1.0])), inputs / "ct_0000.nii.gz")
        env = {**os.environ, "nnUNet_raw": str(work), "nnUNet_preprocessed": str(work), "nnUNet_results": str(work)}
        tools = {
            "nnunet": lambda out: [str(bin_dir / "nnUNetv2_predict_from_modelfolder"), "-i", str(inputs), "-o", str(out),
                                   "-m", str(folder), "-f", "0", "-device", args.device, "-npp", "1", "-nps", "1",
                                   *([] if args.tta else ["--disable_tta"])],
            "medseg": lambda out: [str(bin_dir / "medseg"), "predict", "-i", str(inputs / "ct_0000.nii.gz"), "-o", str(out),
                                   "-m", str(folder), "-d", args.device, *([] if args.tta else ["--no-tta"])],
            "medseg_fast": lambda out: [str(bin_dir / "medseg"), "predict", "-i", str(inputs / "ct_0000.nii.gz"), "-o",
                                        str(out), "-m", str(folder), "-d", args.device, "--fast"],
        }
        names = list(tools)
        walls: dict[str, list[float]] = {n: [] for n in names}
        rss: dict[str, list[float]] = {n: [] for n in names}
        timings: dict[str, list[dict]] = {"medseg": [], "medseg_fast": []}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                out = work / f"{name}_{r}"
                wall, peak = timed(tools[name](out), env)
                walls[name].append(wall)
                rss[name].append(peak)
                if name in timings:
                    manifest = json.loads((out / "manifest.json").read_text())
                    timings[name].append(manifest["cases"][0].get("timings", {}))
                print(f"round {r} {name}: {wall:.1f} s, {peak:.0f} MB", flush=True)
        last = args.rounds - 1
        ref = np.asarray(nib.load(work / f"nnunet_{last}" / "ct.nii.gz").dataobj)
        agreement = {}
        for name in ("medseg", "medseg_fast"):
            ours = np.asarray(nib.load(work / f"{name}_{last}" / "ct.nii.gz").dataobj)
            agreement[name] = {"voxels_equal": float((ours == ref).mean()),
                               "dice_vs_nnunet": {H.DATASET_LABELS[k]: round(dice(ours, ref, k), 5) for k in (1, 2)}}
        med = {n: float(np.median(v)) for n, v in walls.items()}
        peak = {n: float(np.median(v)) for n, v in rss.items()}
        save(args.name, {
            "setup": {"input": [512, 512, args.slices], "input_spacing_mm": SPACING, "plans_spacing_mm_zyx": [2.0, 1.0, 1.0],
                      "patch": plans["configurations"]["3d_fullres"]["patch_size"], "folds": 1, "mirroring": bool(args.tta), "device": args.device,
                      "network": "PlainConvUNet 4-8-16 features (the non-network share is what is compared)",
                      "rounds": args.rounds, "nnunetv2": _version("nnunetv2")},
            "wall_s": {n: [round(x, 2) for x in v] for n, v in walls.items()},
            "peak_rss_mb": {n: [round(x) for x in v] for n, v in rss.items()},
            "throughput_ratio_vs_nnunet": {n: round(med["nnunet"] / med[n], 3) for n in ("medseg", "medseg_fast")},
            "peak_rss_ratio_vs_nnunet": {n: round(peak[n] / peak["nnunet"], 3) for n in ("medseg", "medseg_fast")},
            "medseg_time_split_s": {n: timings[n][-1] for n in timings},
            "non_network": _non_network(walls, timings),
            "agreement": agreement,
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _non_network(walls: dict[str, list[float]], timings: dict[str, list[dict]]) -> dict:
    """What users wait for besides the network: each run's wall minus its network seconds. nnU-Net reports no
    network time, so its share is estimated with medseg exact's network seconds of the same round (same network,
    windows, threads and float16 accumulation): an estimate, named so."""
    net = [t.get("nnunet_network_s", 0.0) for t in timings["medseg"]]
    ours = [w - n for w, n in zip(walls["medseg"], net)]
    theirs = [w - n for w, n in zip(walls["nnunet"], net)]
    return {"network_s_medseg_exact": [round(n, 2) for n in net],
            "medseg_exact_s": [round(x, 2) for x in ours],
            "nnunet_estimated_s": [round(x, 2) for x in theirs],
            "ratio_nnunet_over_medseg_exact": round(float(np.median(theirs)) / float(np.median(ours)), 3)}


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
