"""Folder evaluation: predictions vs references -> ``metrics.csv``, ``summary.json``, ``evaluation.json``.

Cases are matched by ID (file name without its format ending); each prediction must lie on its reference's
grid. Every metric is computed in physical units from the reference's voxel spacing. Cases run in parallel
processes. ``evaluation.json`` records labels, settings, per-case geometry and metadata; no input folder is
recorded (folder names can carry patient names). The report's case figures are drawn by the caller
(:func:`medseg.reporting.report.write_overlays`), so this module depends on nothing above it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Collection
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg import threads
from medseg.config import EvaluationConfig, load_config
from medseg.errors import InputError, require_exists
from medseg.fsutil import atomic_write, check_output_dir, write_json
from medseg.io.readers import files_by_id, read_volume
from medseg.metrics.aggregate import summarize
from medseg.metrics.catalogue import add_derived, columns, names
from medseg.metrics.lesion import f1_score, lesion_detection
from medseg.metrics.overlap import dice, iou
from medseg.metrics.surface import assd, hausdorff, nsd, surface_distances

COLUMNS = columns()  # case, label and every metric of the catalogue (medseg.metrics.catalogue)
SUMMARY_METRICS = names("summary")
NAN = float("nan")


@dataclass(frozen=True)
class _CaseTask:
    case: str
    pred: Path
    ref: Path
    labels: dict[int, str]
    settings: EvaluationConfig
    allowed: tuple[int, ...]  # label values the maps may hold (the scored labels and any others declared)


def _touches_border(mask: np.ndarray) -> bool:
    return any(mask.take(0, axis=a).any() or mask.take(-1, axis=a).any() for a in range(mask.ndim))


def label_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], unit_size: float, tolerance_mm: float, s: EvaluationConfig
) -> dict[str, Any]:
    """All metrics of one label in one case.

    Args:
        pred: Boolean predicted mask ``(X, Y[, Z])``.
        ref: Boolean reference mask, same shape.
        spacing: Voxel spacing in mm.
        unit_size: Size of one voxel in the reported unit (mL for volumes, cm² for 2D images).
        tolerance_mm: NSD tolerance τ.
        s: Empty-mask rules and lesion matching settings.
    """
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    vol_p, vol_r = n_pred * unit_size, n_ref * unit_size
    out: dict[str, Any] = {
        "vol_ref_ml": vol_r,
        "vol_pred_ml": vol_p,
        "vol_err_ml": vol_p - vol_r,
        "vol_err_pct": 100.0 * (vol_p - vol_r) / vol_r if n_ref else NAN,
        "nsd_tol_mm": tolerance_mm,
        "touches_border": _touches_border(pred) or _touches_border(ref),
    }
    distances = surface_distances(pred, ref, spacing)
    if distances is not None:
        out |= {
            "dice": dice(pred, ref), "iou": iou(pred, ref), "hd95": hausdorff(distances, 95), "hd": hausdorff(distances),
            "assd": assd(distances), "nsd": nsd(distances, tolerance_mm),
        }
    elif n_pred == 0 and n_ref == 0:
        perfect = s.empty_both == "perfect"
        out |= dict.fromkeys(["dice", "iou", "nsd"], 1.0 if perfect else NAN)
        out |= dict.fromkeys(["hd95", "hd", "assd"], 0.0 if perfect else NAN)
    else:
        diagonal = float(np.linalg.norm(np.array(pred.shape) * np.array(spacing)))
        out |= {"dice": 0.0, "iou": 0.0, "nsd": 0.0}
        out |= dict.fromkeys(["hd95", "hd", "assd"], diagonal if s.empty_one_distance == "diagonal" else NAN)
    lesions = lesion_detection(pred, ref, s.lesion_overlap, s.lesion_connectivity)
    out |= {
        "lesions_ref": lesions.n_ref, "lesions_pred": lesions.n_pred, "lesions_tp": lesions.tp_ref,
        "lesions_fp": lesions.fp, "lesions_fn": lesions.fn, "lesion_f1": lesions.f1,
        "lesion_sensitivity": lesions.sensitivity, "lesion_precision": lesions.precision,
        "lesion_dice": lesions.lesion_dice,
    }
    return out


def label_array(volume, allowed, what: str) -> np.ndarray:
    """The single-channel integer label map of ``volume``, holding only background (0) and the values in
    ``allowed``: a label map with more channels, fractional values or undeclared values is refused (scoring it
    would give a Dice of 0 for what is really a mismatch of label sets).

    Raises:
        InputError: ``LABEL_CHANNELS``, ``LABEL_NOT_INTEGER``, ``LABEL_VALUES_UNEXPECTED``.
    """
    if volume.array.shape[0] != 1:
        raise InputError("LABEL_CHANNELS", f"{what} has {volume.array.shape[0]} channels; a label map has one")
    arr = volume.array[0]
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise InputError("LABEL_NOT_INTEGER", f"{what} holds non-integer values",
                             "label maps hold whole numbers (resample labels with nearest neighbour)")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iub":
        raise InputError("LABEL_NOT_INTEGER", f"{what} has voxels of type {arr.dtype}, not integers")
    allowed = np.array(sorted({0, *allowed}), dtype=np.int64)
    unexpected = ~np.isin(arr, allowed)
    if unexpected.any():
        values = np.unique(arr[unexpected])
        raise InputError("LABEL_VALUES_UNEXPECTED", f"{what} holds value(s) {values[:10].tolist()} outside the labels "
                         f"{allowed.tolist()}", "declare the labels with --dataset DIR or -m MODEL (without them, "
                         "the first reference's values are the labels), or fix the file")
    return arr


def _evaluate_case(task: _CaseTask) -> tuple[list[dict], dict]:
    ref, pred = read_volume(task.ref), read_volume(task.pred)
    if not pred.same_grid(ref):
        raise InputError(
            "GRID_MISMATCH",
            f"case {task.case}: prediction grid {pred.spatial_shape} / spacing {np.round(pred.spacing, 4).tolist()} "
            f"differs from reference {ref.spatial_shape} / {np.round(ref.spacing, 4).tolist()} (or their affines differ)",
            "predict on the reference images' grid",
        )
    is_3d = len(ref.spatial_shape) == 3
    unit_size = ref.unit_volume_ml
    ref_arr = label_array(ref, task.allowed, f"case {task.case}: the reference {task.ref.name}")
    pred_arr = label_array(pred, task.allowed, f"case {task.case}: the prediction {task.pred.name}")
    rows = []
    for value, name in task.labels.items():
        tol = task.settings.nsd_tolerance_per_label.get(name, task.settings.nsd_tolerance_mm)
        metrics = label_metrics(pred_arr == value, ref_arr == value, ref.spacing, unit_size, tol, task.settings)
        rows.append(add_derived({"case": task.case, "label": name, **metrics}))
    info = {"shape": list(ref.spatial_shape), "spacing": [round(s, 6) for s in ref.spacing], "dims": 3 if is_3d else 2}
    return rows, info


def _read_metadata(path: Path) -> dict[str, dict[str, str]]:
    require_exists(path, "metadata CSV")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "case" not in reader.fieldnames:
            raise InputError("METADATA_INVALID", f"{path} needs a 'case' column, found {reader.fieldnames}")
        return {row["case"]: {k: v for k, v in row.items() if k != "case"} for row in reader}


def summarize_rows(rows: list[dict], labels: dict[int, str], s: EvaluationConfig) -> dict:
    """Per label: a :func:`summarize` of each metric, and pooled lesion counts."""
    summary: dict = {}
    for name in labels.values():
        mine = [r for r in rows if r["label"] == name]
        entry = {m: summarize([float(r[m]) for r in mine], s.bootstrap, s.ci_level) for m in SUMMARY_METRICS}
        tp, n_ref, n_pred = (sum(int(r[k]) for r in mine) for k in ("lesions_tp", "lesions_ref", "lesions_pred"))
        tp_pred = n_pred - sum(int(r["lesions_fp"]) for r in mine)
        sens, prec = (tp / n_ref if n_ref else NAN), (tp_pred / n_pred if n_pred else NAN)
        entry["lesions_pooled"] = {
            "n_ref": n_ref, "n_pred": n_pred, "detected": tp, "false_positive": n_pred - tp_pred, "missed": n_ref - tp,
            "sensitivity": sens, "precision": prec, "f1": f1_score(prec, sens, n_ref, n_pred),
            "fp_per_case": (n_pred - tp_pred) / len(mine) if mine else NAN,
        }
        summary[name] = entry
    return summary


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def evaluate_folders(
    pred_dir: Path,
    ref_dir: Path,
    out_dir: Path,
    *,
    settings: EvaluationConfig | None = None,
    labels: dict[int, str] | None = None,
    metadata: Path | None = None,
    context: dict | None = None,
    window: tuple[float, float] | None = None,
    cases: list[str] | None = None,
    allowed: Collection[int] | None = None,
    qc: dict[str, dict] | None = None,
) -> dict:
    """Evaluates every reference case (or the listed ones) against its prediction and writes ``metrics.csv``,
    ``summary.json`` and ``evaluation.json`` (what :mod:`medseg.reporting` draws the report from; it draws
    nothing itself: :func:`medseg.reporting.report.write_overlays` makes the case figures).

    Args:
        pred_dir: Folder of predicted label maps (NIfTI or PNG).
        out_dir: Where ``metrics.csv``, ``summary.json`` and ``evaluation.json`` go.
        settings: The ``evaluation`` config section (default: ``configs/base.yaml``'s).
        labels: ``{value: name}`` of the labels to score; default: every non-zero value in the first reference.
        metadata: Optional CSV with a ``case`` column and any others (scanner, site, ...) for subgroup tables.
        context: Extra header fields for the report (model, MLflow run, config hash, ...).
        window: Display window of the images in the report (e.g. a CT window in HU).
        cases: Evaluate only these case IDs (default: every reference in ``ref_dir``).
        allowed: Label values the maps may hold besides background (default: those of ``labels``); give the full
            set to score only some labels of maps that hold more.
        qc: The QC record ``medseg predict`` wrote per case (:func:`medseg.inference.manifest.qc_records`), so
            the report can set the reference-free score against the true Dice.

    Returns:
        The summary: per label name, per metric ``{n, n_undefined, mean, median, q1, q3, iqr, min, max,
        ci_low, ci_high}``, plus ``lesions_pooled``.

    Examples:
        >>> import tempfile, numpy as np
        >>> from pathlib import Path
        >>> from medseg.io.nifti import write_nifti
        >>> from medseg.io.volume import Volume
        >>> root = Path(tempfile.mkdtemp())
        >>> mask = np.zeros((1, 8, 8, 4), np.uint8); mask[0, 2:6, 2:6, 1:3] = 1
        >>> for folder in ("pred", "ref"):
        ...     _ = write_nifti(Volume(mask, np.eye(4)), root / folder / "case.nii.gz")
        >>> summary = evaluate_folders(root / "pred", root / "ref", root / "eval", labels={1: "organ"})
        >>> summary["organ"]["dice"]["mean"], sorted(p.name for p in (root / "eval").iterdir())
        (1.0, ['evaluation.json', 'metrics.csv', 'summary.json'])

    Raises:
        InputError: ``PATH_NOT_FOUND``, ``NO_INPUTS``, ``EVAL_MISSING_PREDICTIONS`` (listing case IDs),
            ``GRID_MISMATCH`` (naming the case and both grids), ``METADATA_INVALID``, ``LABEL_VALUES_UNEXPECTED``,
            ``LABEL_NOT_INTEGER``.
        OutputError: ``OUTPUT_IS_FILE``, ``OUTPUT_NOT_WRITABLE``, ``DISK_FULL`` (checked before the work).
    """
    settings = settings or load_config(None).evaluation
    refs, preds = _matched(pred_dir, ref_dir, cases)
    check_output_dir(out_dir)  # a folder that cannot take the results is refused before the work
    meta = _read_metadata(metadata) if metadata else {}
    labels = labels if labels is not None else _first_reference_labels(next(iter(refs.values())))
    known = tuple(sorted(set(labels) | set(allowed or ())))
    tasks = [_CaseTask(case, preds[case], path, labels, settings, known) for case, path in sorted(refs.items())]
    workers = threads.workers(settings.workers, len(tasks))
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, initializer=threads.limit_worker) as pool:
            results = list(pool.map(_evaluate_case, tasks))
    else:
        results = [_evaluate_case(t) for t in tasks]
    rows = [row for case_rows, _ in results for row in case_rows]
    _write_rows(out_dir / "metrics.csv", rows)
    summary = summarize_rows(rows, labels, settings)
    write_json(out_dir / "summary.json", _json_safe(summary))
    dims = results[0][1]["dims"]
    write_json(out_dir / "evaluation.json", {
        "labels": {str(k): v for k, v in labels.items()},
        "cases": {t.case: {**info, "metadata": meta.get(t.case, {})} for t, (_, info) in zip(tasks, results)},
        "units": {"volume": "mL" if dims == 3 else "cm²"},
        "settings": settings.model_dump(mode="json"),
        "context": context or {},
        "window": list(window) if window else None,
        "qc": {case: record for case, record in (qc or {}).items() if case in refs},
    })
    return summary


def _matched(pred_dir: Path, ref_dir: Path, cases: list[str] | None) -> tuple[dict[str, Path], dict[str, Path]]:
    """``(references, predictions)`` by case ID: every reference (or the listed ones) with its prediction.

    Raises:
        InputError: ``PATH_NOT_FOUND``, ``EVAL_UNKNOWN_CASES``, ``NO_INPUTS``, ``EVAL_MISSING_PREDICTIONS``.
    """
    require_exists(pred_dir, "prediction folder")
    require_exists(ref_dir, "reference folder")
    refs, preds = files_by_id(ref_dir), files_by_id(pred_dir)
    if cases is not None:
        unknown = sorted(set(cases) - set(refs))
        if unknown:
            raise InputError("EVAL_UNKNOWN_CASES", f"no reference for case(s) {', '.join(unknown[:20])} in {ref_dir}")
        refs = {c: refs[c] for c in cases}
    if not refs:
        raise InputError("NO_INPUTS", f"no reference label files (.nii/.nii.gz/.png) in {ref_dir}")
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise InputError(
            "EVAL_MISSING_PREDICTIONS",
            f"{len(missing)} reference case(s) have no prediction in {pred_dir}: {', '.join(missing[:20])}",
        )
    return refs, preds


def _first_reference_labels(path: Path) -> dict[int, str]:
    """The labels when none are declared: the first reference's values (it must be an integer label map)."""
    first = read_volume(path)
    values = {int(v) for v in np.unique(first.array) if float(v).is_integer()}
    label_array(first, values, f"the reference {path.name}")
    return {v: str(v) for v in sorted(values) if v != 0}


def _write_rows(path: Path, rows: list[dict]) -> None:
    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    atomic_write(path, write_csv)
