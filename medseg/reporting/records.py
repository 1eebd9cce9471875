"""Reading an evaluation folder back for ``medseg report``: ``metrics.csv``, ``summary.json``, ``evaluation.json``
and ``overlays/overlays.json``, each validated against what ``medseg evaluate`` writes.

A damaged or hand-edited file is refused with ``EVAL_DIR_INVALID`` naming the file and the field, never met later
as a ``KeyError`` deep in the report: labels must agree between the files, numbers must be numbers, the bootstrap
count is bounded (a hand-edited 10^9 resamples would run for days), and figure files must lie inside
``overlays/`` (a record cannot make the report embed a file from elsewhere).
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model, field_validator

from medseg.errors import InputError, require_exists
from medseg.metrics.catalogue import METRICS

NUMERIC = tuple(m for m in METRICS if m != "touches_border")  # metrics.csv's numeric columns (the catalogue's)
FILES = ("metrics.csv", "summary.json", "evaluation.json")
_HINT = "run `medseg evaluate` again to recreate the evaluation folder"


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class Settings(_Record):
    """The ``evaluation`` settings a report needs (defaults for keys added after a folder was written)."""

    nsd_tolerance_mm: float
    nsd_tolerance_per_label: dict[str, float] = {}
    lesion_overlap: float
    lesion_connectivity: str
    empty_both: str
    empty_one_distance: str
    bootstrap: int = Field(ge=1, le=100_000)
    ci_level: float = Field(gt=0, lt=1)
    flag_dice_below: float
    flag_worst_fraction: float = Field(ge=0, le=1)
    flag_volume_error_pct: float
    small_subgroup: int = Field(ge=1)
    report_max_flagged_overlays: int = Field(40, ge=0, le=10_000)
    report_slice_thickness_bins_mm: list[float] = [2.5, 5.0]


class _CaseInfo(_Record):
    shape: list[int]
    spacing: list[float]
    dims: Literal[2, 3]
    metadata: dict[str, Any] = {}


class _QcEntry(_Record):
    verdict: str
    score: float | None = None
    reasons: list[str] = []


class _Units(_Record):
    volume: str


class Evaluation(_Record):
    labels: dict[str, str]
    cases: dict[str, _CaseInfo]
    units: _Units
    settings: Settings
    context: dict[str, Any] = {}
    window: tuple[float, float] | None = None
    qc: dict[str, _QcEntry] = {}

    @field_validator("labels")
    @classmethod
    def _integer_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            int(key)
        return value


class _Metric(_Record):
    n: int
    n_undefined: int = 0
    mean: float | None = None
    median: float | None = None
    q1: float | None = None
    q3: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None


class _Pooled(_Record):
    n_ref: int
    n_pred: int
    detected: int
    fp_per_case: float | None = None


#: What a label's entry in summary.json holds: every summarised metric of the catalogue (required: those the report's
#: sentences use; optional: the others, so a folder written before a metric was added still reads).
_REQUIRED = ("dice", "iou", "nsd", "hd95", "hd", "assd", "vol_err_pct", "lesion_f1")
_LabelSummary: Any = create_model(  # type: ignore[call-overload]  # fields from the catalogue
    "_LabelSummary", __base__=_Record, lesions_pooled=(_Pooled, ...),
    **{m.name: (_Metric, ...) if m.name in _REQUIRED else (_Metric | None, None) for m in METRICS.values() if m.summary},
)


class _Overlay(_Record):
    case: str
    why: str
    file: str
    caption: str = ""
    flags: list[str] = []
    viewer: str | None = None  # the case's viewer file (medseg.reporting.viewer), inside overlays/

    @field_validator("file")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+\.png", value) or value.startswith("."):
            raise ValueError(f"a figure is a PNG file inside overlays/, found {value!r:.80}")
        return value

    @field_validator("viewer")
    @classmethod
    def _plain_viewer_name(cls, value: str | None) -> str | None:
        if value is not None and (not re.fullmatch(r"[A-Za-z0-9_.-]+\.viewer\.npz", value) or value.startswith(".")):
            raise ValueError(f"a viewer is a .viewer.npz file inside overlays/, found {value!r:.80}")
        return value


class Overlays(_Record):
    overlays: list[_Overlay]
    flagged_not_shown: int = Field(0, ge=0)


def _validated(model: Any, data: Any, name: str) -> Any:
    try:
        return TypeAdapter(model).validate_python(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "top level"
        raise InputError("EVAL_DIR_INVALID", f"{name} is not as `medseg evaluate` writes it: {where}: {err['msg']}",
                         _HINT) from None


def read_json_record(path: Path, model: Any) -> Any:
    """One JSON file of the folder, validated against ``model``.

    Raises:
        InputError: ``EVAL_DIR_INVALID``.
    """
    from medseg.fsutil import read_json

    return _validated(model, read_json(path, "EVAL_DIR_INVALID", "evaluation file", _HINT), path.name)


def _number(text: str | None, where: str) -> float:
    if text in (None, ""):
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise InputError("EVAL_DIR_INVALID", f"metrics.csv, {where}: {text!r:.40} is not a number", _HINT) from None


def read_rows(path: Path, labels: set[str], cases: set[str]) -> list[dict]:
    """The rows of ``metrics.csv`` with numbers parsed, each naming a known case and label.

    Raises:
        InputError: ``EVAL_DIR_INVALID``.
    """
    from medseg.errors import describe

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError("EVAL_DIR_INVALID", f"metrics.csv cannot be read: {describe(exc, path)}", _HINT) from None
    for i, row in enumerate(rows, start=2):
        if row.get("case") not in cases or row.get("label") not in labels:
            raise InputError("EVAL_DIR_INVALID", f"metrics.csv, line {i}: case {row.get('case')!r:.40} / label "
                             f"{row.get('label')!r:.40} is not one evaluation.json lists", _HINT)
        for key in NUMERIC:  # a column added to the catalogue after the folder was written reads as undefined
            row[key] = _number(row.get(key), f"line {i}, {key}")
        row["touches_border"] = row.get("touches_border") == "True"
    return rows


def load_evaluation(eval_dir: Path) -> tuple[list[dict], dict, dict]:
    """``(metric rows, summary, evaluation record)`` of an evaluation folder, all validated and consistent (the
    summary covers every label, every row names a listed case and label).

    Raises:
        InputError: ``PATH_NOT_FOUND``; ``EVAL_DIR_INVALID`` (a file missing, unreadable or not as written).
    """
    require_exists(eval_dir, "evaluation folder")
    missing = [n for n in FILES if not (eval_dir / n).is_file()]
    if missing:
        raise InputError("EVAL_DIR_INVALID", f"{eval_dir.name} lacks {', '.join(missing)}", "run `medseg evaluate` to create it")
    record = read_json_record(eval_dir / "evaluation.json", Evaluation)
    names = set(record.labels.values())
    summary = read_json_record(eval_dir / "summary.json", dict[str, _LabelSummary])
    if names - set(summary):
        raise InputError("EVAL_DIR_INVALID", f"summary.json lacks the label(s) {sorted(names - set(summary))}", _HINT)
    rows = read_rows(eval_dir / "metrics.csv", names, set(record.cases))
    # An optional metric absent from an older folder is left out; undefined statistics inside a metric stay None.
    plain_summary = {name: {k: v for k, v in entry.model_dump().items() if v is not None} for name, entry in summary.items()}
    return rows, plain_summary, record.model_dump(mode="json")
