"""Evaluation speed: `medseg evaluate` on 100 synthetic cases of 128^3 (organ + lesions) vs MONAI's metric
classes (Dice, HD95, symmetric ASSD, surface Dice) on the same files, in the same run.

    .venv/bin/python benchmarks/evaluation.py [--cases 100] [--size 128]

Target (issue 7): 100 cases of 128^3 in under 2 minutes on the 2-core CI-class machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parent))
from _common import save

from medseg.io.nifti import read_nifti, write_nifti
from medseg.io.volume import Volume
from medseg.metrics.evaluate import evaluate_folders
from medseg.reporting.report import write_report


def make_pair(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: an organ (label 1) with 1-4 lesions (label 2); prediction: a perturbed copy."""
    grid = np.indices((size,) * 3, dtype=np.float32) - size / 2
    radii = rng.uniform(0.2, 0.35, 3) * size
    organ = ((grid / radii[:, None, None, None]) ** 2).sum(0) < 1
    ref = organ.astype(np.uint8)
    for _ in range(rng.integers(1, 5)):
        c = rng.uniform(-0.15, 0.15, 3) * size
        r = rng.uniform(2, 8)
        ref[(((grid - c[:, None, None, None]) ** 2).sum(0) < r * r) & organ] = 2
    pred = ndimage.shift(ref, rng.uniform(-2, 2, 3), order=0)
    pred[ndimage.binary_erosion(pred == 1, iterations=2) & (rng.random(pred.shape) < 0.001)] = 2  # small FPs
    return pred, ref


def monai_peer(pred_dir: Path, ref_dir: Path, labels: list[int], tol: float) -> float:
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric, SurfaceDistanceMetric

    metrics = [
        DiceMetric(include_background=False, ignore_empty=True),
        HausdorffDistanceMetric(include_background=False, percentile=95),
        SurfaceDistanceMetric(include_background=False, symmetric=True),
    ]
    nsd = SurfaceDiceMetric([tol] * len(labels), include_background=False)
    start = time.perf_counter()
    for ref_path in sorted(ref_dir.glob("*.nii.gz")):
        ref, pred = read_nifti(ref_path), read_nifti(pred_dir / ref_path.name)
        spacing = list(ref.spacing)
        onehot = [torch.from_numpy(np.stack([v.array[0] == k for k in [0, *labels]])[None]) for v in (pred, ref)]
        for m in metrics:
            m(onehot[0], onehot[1], **({"spacing": spacing} if not isinstance(m, DiceMetric) else {}))
        nsd(onehot[0], onehot[1], spacing=spacing)
    for m in [*metrics, nsd]:
        m.aggregate()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    with tempfile.TemporaryDirectory() as tmp:
        pred_dir, ref_dir = Path(tmp) / "pred", Path(tmp) / "ref"
        for i in range(args.cases):
            pred, ref = make_pair(rng, args.size)
            write_nifti(Volume(ref[None], affine), ref_dir / f"case_{i:03d}.nii.gz")
            write_nifti(Volume(pred[None], affine), pred_dir / f"case_{i:03d}.nii.gz")
        start = time.perf_counter()
        evaluate_folders(pred_dir, ref_dir, Path(tmp) / "ev", labels={1: "organ", 2: "lesion"})
        ours = time.perf_counter() - start
        start = time.perf_counter()
        write_report(Path(tmp) / "ev")
        report_s = time.perf_counter() - start
        peer = monai_peer(pred_dir, ref_dir, [1, 2], 2.0)
    save("evaluation", {
        "what": f"{args.cases} cases of {args.size}^3, labels organ+lesion",
        "medseg_evaluate_s": round(ours, 2),
        "medseg_metrics": "dice, iou, hd, hd95, assd, nsd, volumes, lesion-wise detection, bootstrap CIs",
        "monai_peer_s": round(peer, 2),
        "monai_peer_metrics": "dice, hd95, assd, surface dice (one process)",
        "ratio_medseg_over_monai": round(ours / peer, 3),
        "medseg_report_s": round(report_s, 2),
        "report_note": "report.html + report.pdf, with overlays of best/median/worst and up to 40 flagged cases",
        "target_s": 120,
        "meets_target": ours < 120,
    })


if __name__ == "__main__":
    main()
