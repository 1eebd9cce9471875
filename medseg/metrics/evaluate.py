"""Folder evaluation: predictions vs references -> ``metrics.csv``, ``summary.json``, ``evaluation.json``.

Cases are matched by ID (file name without ``.nii``/``.nii.gz``); each prediction must lie on its
reference's grid. ``evaluation.json`` records the inputs and labels so that :mod:`medseg.reporting` can
draw the report later from the evaluation folder alone.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from medseg.errors import InputError, require_exists
from medseg.io.nifti import nifti_files_by_id, read_nifti
from medseg.metrics.overlap import dice, iou

COLUMNS = ["case", "label", "dice", "iou", "vol_ref_ml", "vol_pred_ml", "vol_err_ml"]


def case_metrics(pred: np.ndarray, ref: np.ndarray, voxel_ml: float, label: int) -> dict[str, float]:
    """Metrics of one label in one case; ``pred`` and ``ref`` are integer label maps of equal shape."""
    p, r = pred == label, ref == label
    vol_p, vol_r = float(p.sum()) * voxel_ml, float(r.sum()) * voxel_ml
    return {"dice": dice(p, r), "iou": iou(p, r), "vol_ref_ml": vol_r, "vol_pred_ml": vol_p, "vol_err_ml": vol_p - vol_r}


def _summary(values: list[float]) -> dict[str, float | int]:
    arr = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return {"n": 0, "n_undefined": len(values), "mean": None, "median": None}
    return {
        "n": int(arr.size),
        "n_undefined": len(values) - int(arr.size),
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def evaluate_folders(
    pred_dir: Path,
    ref_dir: Path,
    out_dir: Path,
    labels: dict[int, str] | None = None,
    images_dir: Path | None = None,
    context: dict | None = None,
    window: tuple[float, float] | None = None,
) -> dict:
    """Evaluates every reference case against its prediction.

    Args:
        pred_dir: Folder of predicted label maps (NIfTI).
        ref_dir: Folder of reference label maps; every case here must have a prediction.
        out_dir: Where ``metrics.csv``, ``summary.json`` and ``evaluation.json`` go.
        labels: ``{value: name}`` of the labels to score; default: every non-zero value in the references.
        images_dir: Optional folder of the images, for overlays in the report.
        context: Extra header fields for the report (model, MLflow run, config hash, ...).
        window: Display window of the images in the report (e.g. a CT window in HU).

    Returns:
        The summary: per label name, per metric ``{n, n_undefined, mean, median, min, max}``.

    Raises:
        InputError: ``PATH_NOT_FOUND``, ``NO_INPUTS``, ``EVAL_MISSING_PREDICTIONS`` (listing case IDs),
            ``GRID_MISMATCH`` (naming the case and both grids).
    """
    require_exists(pred_dir, "prediction folder")
    require_exists(ref_dir, "reference folder")
    refs = nifti_files_by_id(ref_dir)
    preds = nifti_files_by_id(pred_dir)
    if not refs:
        raise InputError("NO_INPUTS", f"no reference label files (.nii/.nii.gz) in {ref_dir}")
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise InputError(
            "EVAL_MISSING_PREDICTIONS",
            f"{len(missing)} reference case(s) have no prediction in {pred_dir}: {', '.join(missing[:20])}",
        )
    rows: list[dict] = []
    for case_id, ref_path in sorted(refs.items()):
        ref, pred = read_nifti(ref_path), read_nifti(preds[case_id])
        if not pred.same_grid(ref):
            raise InputError(
                "GRID_MISMATCH",
                f"case {case_id}: prediction grid {pred.spatial_shape} / spacing {np.round(pred.spacing, 4).tolist()} "
                f"differs from reference {ref.spatial_shape} / {np.round(ref.spacing, 4).tolist()} (or their affines differ)",
                "predict on the reference images' grid",
            )
        ref_arr, pred_arr = ref.array[0].astype(np.int64), pred.array[0].astype(np.int64)
        if labels is None:
            found = sorted(int(v) for v in np.unique(ref_arr) if v != 0)
            labels = {v: str(v) for v in found}
        for value, name in labels.items():
            rows.append({"case": case_id, "label": name, **case_metrics(pred_arr, ref_arr, ref.voxel_volume_ml, value)})

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    summary = {
        name: {metric: _summary([r[metric] for r in rows if r["label"] == name]) for metric in COLUMNS[2:]}
        for name in (labels or {}).values()
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    record = {
        "pred_dir": str(pred_dir.resolve()),
        "ref_dir": str(ref_dir.resolve()),
        "images_dir": str(images_dir.resolve()) if images_dir else None,
        "labels": {str(k): v for k, v in (labels or {}).items()},
        "cases": sorted(refs),
        "context": context or {},
        "window": list(window) if window else None,
    }
    (out_dir / "evaluation.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return summary

