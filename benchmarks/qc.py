"""Does reference-free QC find the failed segmentations? (``benchmarks/results/qc.json``)

    .venv/bin/python benchmarks/qc.py [--cases 10] [--epochs 40]

Trains the demo model (3D UNet, ``configs/demo.yaml``) on 16 synthetic CT cases and an under-trained copy
(2 epochs of 10 iterations), then predicts 10 other synthetic cases (another seed) as they are and with the
failures a user meets:

* ``noise``: Gaussian noise, sigma 150 HU;
* ``mr``: a wrong modality — an MR-like image (positive arbitrary units, soft-tissue contrast inverted, air ~ 0);
* ``crop``: the field of view cut to the middle 40 % along the first axis (the organ cut off);
* ``flip``: the voxel order reversed along the first and last axes with the header unchanged (a wrong orientation);
* ``blur``: Gaussian blur of 4 mm;
* ``undertrained``: the clean cases through the under-trained model.

The true Dice of a case is the mean over the labels its reference has (a predicted label that the reference lacks
counts 0), against the reference transformed like the image. A case *fails* when that Dice is below 0.5. For
the QC score (higher = more trustworthy) it reports the AUROC of ``1 - score`` for detecting failures and the
Spearman correlation of the score with the true Dice, for QC without TTA (uncertainty + plausibility) and with
mirror TTA (plus agreement between the 8 flips), the verdict's sensitivity and specificity at the default
thresholds, a threshold sweep, and the time QC adds to ``predict_case`` (without TTA: no extra forward pass;
median of alternating rounds on the clean cases, and on three of them upsampled 2.5x).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage, stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import save

from medseg import threads
from medseg.config import load_config
from medseg.inference.predictor import Predictor
from medseg.io.readers import read_volume
from medseg.io.volume import Volume
from medseg.qc.assess import PLAUSIBILITY
from medseg.sample_data import write_sample_data
from medseg.training.trainer import fit

VARIANTS = ("clean", "noise", "mr", "crop", "flip", "blur", "undertrained")


def _train(dataset: Path, run: Path, overrides: list[str]) -> Path:
    cfg = load_config("demo", [f"data.dataset={dataset}", *overrides])
    return fit(cfg, run, show_progress=False).model_dir


def _variant(name: str, image: Volume, label: Volume, rng: np.random.Generator) -> tuple[Volume, Volume]:
    data, ref = image.array.astype(np.float32), label.array
    if name == "noise":
        data = data + rng.normal(0, 150, data.shape).astype(np.float32)
    elif name == "mr":
        body = data > -500
        data = np.where(body, 900 - 2.0 * (data - 40), 20 + rng.normal(0, 5, data.shape)).astype(np.float32)
    elif name == "blur":
        sigma = [0.0] + [4.0 / s for s in image.spacing]
        data = ndimage.gaussian_filter(data, sigma)
    elif name == "crop":
        n = data.shape[1]
        lo, hi = int(n * 0.3), int(n * 0.7)
        affine = image.affine.copy()
        affine[:3, 3] = image.affine[:3, :3] @ np.array([lo, 0, 0]) + image.affine[:3, 3]
        return Volume(np.ascontiguousarray(data[:, lo:hi]), affine), Volume(np.ascontiguousarray(ref[:, lo:hi]), affine)
    elif name == "flip":
        data, ref = data[:, ::-1, :, ::-1].copy(), ref[:, ::-1, :, ::-1].copy()
    return Volume(data, image.affine), Volume(ref, image.affine)


def _dice(pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> float:
    scores = []
    for lab in labels:
        p, r = pred == lab, ref == lab
        if r.any():
            scores.append(2 * np.logical_and(p, r).sum() / (p.sum() + r.sum()))
        elif p.any():
            scores.append(0.0)
    return float(np.mean(scores)) if scores else 1.0


def _auroc(score_bad: np.ndarray, failed: np.ndarray) -> float | None:
    if failed.all() or not failed.any():
        return None
    u = stats.mannwhitneyu(score_bad[failed], score_bad[~failed], alternative="two-sided").statistic
    return round(float(u / (failed.sum() * (~failed).sum())), 4)


def _review(qc: dict, max_uncertainty: float, min_agreement: float) -> bool:
    if any(r["code"] in PLAUSIBILITY for r in qc["reasons"]):
        return True
    signals = qc["signals"]
    unc = [v for n, v in signals["uncertainty"].items() if v is not None and signals["volumes_ml"].get(n, 0) > 0]
    agree = [v for per in signals["agreement"].values() for v in per.values()]
    return any(v > max_uncertainty for v in unc) or any(v < min_agreement for v in agree)


def _summary(rows: list[dict], settings) -> dict:
    dice = np.array([r["dice"] for r in rows])
    score = np.array([r["qc"]["score"] for r in rows])
    failed = dice < 0.5
    review = np.array([r["qc"]["verdict"] == "review" for r in rows])
    rho = stats.spearmanr(score, dice).statistic
    sweep = []
    for t in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        for a in (0.5, 0.6, 0.7, 0.8, 0.9):
            flagged = np.array([_review(r["qc"], t, a) for r in rows])
            sweep.append({"max_uncertainty": t, "min_agreement": a,
                          "sensitivity": round(float(flagged[failed].mean()), 3) if failed.any() else None,
                          "specificity": round(float((~flagged[~failed]).mean()), 3) if (~failed).any() else None})
    return {
        "cases": len(rows), "failures": int(failed.sum()),
        "auroc_failure": _auroc(1 - score, failed),
        "spearman_score_dice": round(float(rho), 4),
        "verdict_sensitivity": round(float(review[failed].mean()), 3) if failed.any() else None,
        "verdict_specificity": round(float((~review[~failed]).mean()), 3) if (~failed).any() else None,
        "thresholds": {"max_uncertainty": settings.max_uncertainty, "min_agreement": settings.min_agreement},
        "per_variant": {v: {"mean_dice": round(float(np.mean([r["dice"] for r in rows if r["variant"] == v])), 3),
                            "mean_score": round(float(np.mean([r["qc"]["score"] for r in rows if r["variant"] == v])), 3),
                            "review": int(sum(r["qc"]["verdict"] == "review" for r in rows if r["variant"] == v)),
                            "reasons": sorted({x["code"] for r in rows if r["variant"] == v for x in r["qc"]["reasons"]})}
                        for v in VARIANTS},
        "sweep": sweep,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    threads.claim(None)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = write_sample_data(root / "train", cases=16, seed=0, kinds=("ct3d",))["ct3d"]
        test = write_sample_data(root / "test", cases=args.cases, seed=1000, kinds=("ct3d",))["ct3d"]
        good = _train(train, root / "good", [f"train.epochs={args.epochs}"])
        weak = _train(train, root / "weak", ["train.epochs=2", "train.iterations_per_epoch=10", "train.val_every=1"])
        cases = [(p, test / "labelsTr" / p.name) for p in sorted((test / "imagesTr").glob("*.nii.gz"))]
        rng = np.random.default_rng(0)
        loaded = [(read_volume(i), read_volume(lab)) for i, lab in cases]
        results: dict[str, dict] = {}
        for tta in (False, True):
            predictors = {"good": Predictor.from_model_dir(good, "cpu", tta=tta),
                          "weak": Predictor.from_model_dir(weak, "cpu", tta=tta)}
            labels = sorted(k for k in predictors["good"].labels if k)
            rows = []
            for variant in VARIANTS:
                predictor = predictors["weak" if variant == "undertrained" else "good"]
                for index, (image, label) in enumerate(loaded):
                    img, ref = _variant(variant, image, label, rng)
                    pred = predictor.predict_case(img, qc=True)
                    rows.append({"variant": variant, "case": index, "dice": _dice(pred.labels.array[0], ref.array[0], labels),
                                 "qc": pred.qc})
            key = "tta" if tta else "no_tta"
            results[key] = _summary(rows, predictors["good"].cfg.inference.qc)
            results[key]["rows"] = [{"variant": r["variant"], "case": r["case"], "dice": round(r["dice"], 4),
                                     "score": r["qc"]["score"], "verdict": r["qc"]["verdict"],
                                     "reasons": [x["code"] for x in r["qc"]["reasons"]]} for r in rows]
        predictor = Predictor.from_model_dir(good, "cpu", tta=False)
        times = {True: [], False: []}
        for _ in range(3):
            for qc in (False, True):
                for image, _ in loaded:
                    start = time.perf_counter()
                    predictor.predict_case(image, qc=qc)
                    times[qc].append(time.perf_counter() - start)
        overhead = {"predict_s_median_without_qc": round(float(np.median(times[False])), 4),
                    "predict_s_median_with_qc": round(float(np.median(times[True])), 4)}
        overhead["ratio"] = round(overhead["predict_s_median_with_qc"] / overhead["predict_s_median_without_qc"], 4)
        # the same cases at 2.5x the resolution (input grid ~250 x 220 x 100): QC's label statistics run on the
        # input grid, the network on the model grid
        large = []
        for image, _ in loaded[:3]:
            affine = image.affine.copy()
            affine[:3, :3] /= 2.5
            large.append(Volume(ndimage.zoom(image.array[0].astype(np.float32), 2.5, order=1)[None], affine))
        times = {True: [], False: []}
        for _ in range(3):
            for qc in (False, True):
                for image in large:
                    start = time.perf_counter()
                    predictor.predict_case(image, qc=qc)
                    times[qc].append(time.perf_counter() - start)
        overhead["large_shape"] = list(large[0].spatial_shape)
        overhead["large_predict_s_median_without_qc"] = round(float(np.median(times[False])), 4)
        overhead["large_predict_s_median_with_qc"] = round(float(np.median(times[True])), 4)
        overhead["large_ratio"] = round(overhead["large_predict_s_median_with_qc"] / overhead["large_predict_s_median_without_qc"], 4)
        info = predictor.info.get("qc", {})
    save("qc", {
        "what": "AUROC of the QC score for cases with Dice < 0.5 and Spearman(score, Dice) on synthetic CT with induced "
                "failures; see the docstring of benchmarks/qc.py",
        "goal": {"auroc": 0.85, "spearman": 0.6, "overhead_ratio": 1.10},
        "temperature": info.get("temperature"), "calibration_nll": [info.get("nll_before"), info.get("nll_after")],
        "epochs": args.epochs, "test_cases": args.cases, **results, "overhead": overhead,
        "seconds": round(time.time() - started, 1),
    })


if __name__ == "__main__":
    main()
