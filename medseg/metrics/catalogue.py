"""The metrics catalogue: every column of ``metrics.csv`` declared once, with what it is and where it appears.

The CSV columns, the summaries (``summary.json``), the report's per-label tables and distribution plots, the PDF's
table and the MLflow metrics are all derived from :data:`METRICS`. A metric computed from the masks is produced
by :func:`medseg.metrics.evaluate.label_metrics`; a *derived* metric (computed from other columns of the same row)
needs no code there: it is one module with a ``derive`` function and one :func:`register_metric` call, imported at
the end of this file (see :mod:`medseg.metrics.relative_volume`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from medseg.registry import Registry


@dataclass(frozen=True)
class Metric:
    """One column of ``metrics.csv``.

    Attributes:
        name: The column (and JSON key, and MLflow name part: ``<prefix>_<name>_<label>``).
        title: How the report names it (with the unit).
        computed: How it is computed, in one line (the report's methods appendix and ``docs/``).
        empty: What it is when the reference, the prediction or both are empty.
        summary: Summarised over cases (mean, CI, median, IQR) in ``summary.json``.
        card: A row of the report's per-label table.
        distribution: A panel of the report's distribution figure.
        pdf: A column of the PDF's per-case table.
        mlflow: Its mean logged to MLflow by training and the demo.
        bounded: Lies in [0, 1] (plots fix that range).
        derive: For a derived metric: ``row -> value`` from the other columns (None: computed from the masks).
    """

    name: str
    title: str
    computed: str
    empty: str = "computed as usual"
    summary: bool = True
    card: bool = False
    distribution: bool = False
    pdf: bool = False
    mlflow: bool = False
    bounded: bool = False
    derive: Callable[[dict], float] | None = None


METRICS: Registry[Metric] = Registry("metric", "metrics.csv")


def register_metric(metric: Metric) -> Metric:
    """Adds a metric to the catalogue (after those registered before it: the CSV keeps that order)."""
    return METRICS.add(metric.name, metric)


_EMPTY_OVERLAP = ("undefined (NaN) when both are empty (1 with evaluation.empty_both: perfect); 0 when exactly one "
                  "is empty")
_EMPTY_DISTANCE = ("undefined when both are empty (0 with empty_both: perfect); when exactly one is empty NaN, or the "
                   "image diagonal with evaluation.empty_one_distance: diagonal")
for _metric in (
    Metric("dice", "Dice", "2|P∩R| / (|P| + |R|)", _EMPTY_OVERLAP, card=True, distribution=True, pdf=True, mlflow=True,
           bounded=True),
    Metric("iou", "IoU", "|P∩R| / |P∪R|", _EMPTY_OVERLAP, card=True, mlflow=True, bounded=True),
    Metric("hd95", "HD95 (mm)", "95th percentile of the boundary distances, the larger of the two directions",
           _EMPTY_DISTANCE, card=True, distribution=True, pdf=True, mlflow=True),
    Metric("hd", "HD (mm)", "largest boundary distance (Hausdorff), the larger of the two directions", _EMPTY_DISTANCE,
           card=True),
    Metric("assd", "ASSD (mm)", "mean of all boundary distances of both directions", _EMPTY_DISTANCE, card=True,
           distribution=True, pdf=True, mlflow=True),
    Metric("nsd", "NSD", "share of boundary voxels within τ mm of the other boundary (normalised surface Dice)",
           _EMPTY_OVERLAP, card=True, distribution=True, pdf=True, mlflow=True, bounded=True),
    Metric("vol_ref_ml", "reference volume (mL)", "voxel count × voxel volume (2D: area in cm²)"),
    Metric("vol_pred_ml", "predicted volume (mL)", "voxel count × voxel volume (2D: area in cm²)"),
    Metric("vol_err_ml", "volume error (mL)", "predicted − reference volume"),
    Metric("vol_err_pct", "volume error (%)", "100 × (predicted − reference) / reference volume",
           "undefined when the reference is empty", card=True, pdf=True, mlflow=True),
    Metric("lesions_ref", "reference lesions", "connected components of the reference", summary=False),
    Metric("lesions_pred", "predicted lesions", "connected components of the prediction", summary=False),
    Metric("lesions_tp", "detected lesions", "reference components covered at least evaluation.lesion_overlap by "
           "predictions", summary=False),
    Metric("lesion_f1", "lesion F1", "F1 of lesion-wise detection", "undefined when both have no lesion", card=True),
    Metric("lesions_fp", "false-positive lesions", "predicted components less than lesion_overlap inside the reference"),
    Metric("lesions_fn", "missed lesions", "reference components not detected", summary=False),
    Metric("lesion_sensitivity", "lesion sensitivity", "detected / reference lesions",
           "undefined without reference lesions"),
    Metric("lesion_precision", "lesion precision", "true / predicted lesions", "undefined without predicted lesions"),
    Metric("lesion_dice", "lesion Dice", "mean Dice over detected reference lesions", "undefined without detections"),
    Metric("nsd_tol_mm", "NSD tolerance τ (mm)", "evaluation.nsd_tolerance_mm (or per label)", summary=False),
    Metric("touches_border", "touches the border", "either mask touches the image border", summary=False),
):
    register_metric(_metric)


def columns() -> list[str]:
    """``metrics.csv``'s columns: case, label, then every metric in catalogue order."""
    return ["case", "label", *METRICS]


def names(flag: str) -> list[str]:
    """The metrics with ``flag`` set (``summary``, ``card``, ``distribution``, ``pdf``, ``mlflow``), in order.

    Examples:
        >>> names("distribution")
        ['dice', 'hd95', 'assd', 'nsd']
    """
    return [m.name for m in METRICS.values() if getattr(m, flag)]


def add_derived(row: dict) -> dict:
    """``row`` with every derived metric computed from its other columns."""
    for metric in METRICS.values():
        if metric.derive is not None:
            row[metric.name] = metric.derive(row)
    return row


from medseg.metrics import relative_volume as _relative_volume  # noqa: E402,F401  (registers "rvd")
