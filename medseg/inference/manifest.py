"""The prediction manifest: one record per case of a ``medseg predict`` run, and reading it back (torch-free, so
``medseg report`` and ``medseg evaluate`` read it without loading a network library).

``OUT/manifest.json`` (``manifest.shard-i-of-n.json`` per shard) holds the model folder names, counts, files that
were ignored and one :class:`CaseResult` per case. It is written atomically after every case, so it always
describes what is on disk. A manifest read back is validated (:func:`read_manifest`): a damaged or hand-edited one
is refused with ``PREDICTION_DIR_INVALID`` naming what is wrong, and output paths in it must stay inside the
folder (no ``..``, no absolute paths), so a manifest cannot make medseg read or embed files elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from medseg.errors import InputError

MANIFEST = "manifest.json"


def manifest_name(shard: tuple[int, int]) -> str:
    """``manifest.json``, or ``manifest.shard-i-of-n.json`` for shard ``(i, n)`` of several."""
    index, count = shard
    return MANIFEST if count == 1 else f"manifest.shard-{index}-of-{count}.json"


@dataclass
class CaseResult:
    """One row of the manifest."""

    case_id: str
    input: str
    status: str  # "ok" | "failed" | "skipped" | "pending"
    output: str | None = None
    sha256: str | None = None
    error_code: str | None = None
    error: str | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    volumes_ml: dict[str, float] | None = None
    series_instance_uid: str | None = None
    slice_geometry: dict | None = None  # DICOM stacks: measured in-plane drift and step spread (tolerated)
    resumed: bool = False
    notes: list[str] = field(default_factory=list)
    qc: dict | None = None  # verdict ("ok" | "review"), score, reasons, signals (medseg.qc)
    delivery: dict | None = None  # results sent on (STOW-RS --push, the listener's C-STORE): status, code, seconds


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Output(_Record):
    file: str
    sha256: str

    @field_validator("file")
    @classmethod
    def _inside(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not value or path.is_absolute() or ".." in path.parts or "\\" in value or ":" in value:
            raise ValueError(f"an output path must be relative to the folder, found {value!r:.80}")
        return value


class _Reason(_Record):
    code: str
    text: str
    label: str | None = None


class _Signals(_Record):
    volumes_ml: dict[str, float] = {}


class _Qc(_Record):
    verdict: Literal["ok", "review"]
    score: float | None = None
    reasons: list[_Reason] = []
    signals: _Signals = _Signals()


class _Case(_Record):
    case_id: str
    input: str = ""
    status: Literal["ok", "failed", "skipped", "pending"]
    output: str | None = None
    sha256: str | None = None
    error_code: str | None = None
    error: str | None = None
    seconds: float = 0.0
    timings: dict[str, float | None] = {}
    outputs: dict[str, _Output] = {}
    volumes_ml: dict[str, float] | None = None
    notes: list[str] = []
    qc: _Qc | None = None
    delivery: dict[str, Any] | None = None
    resumed: bool = False


class _Manifest(_Record):
    model: list[str] = []
    cases: list[_Case]


def read_manifest(path: Path) -> dict:
    """One manifest file, validated: ``{"model": [...], "cases": [case dict, ...], ...}`` with the case fields
    of :class:`CaseResult` (unknown extra fields are kept).

    Raises:
        InputError: ``PREDICTION_DIR_INVALID`` when it cannot be read, is not JSON, or is not a manifest (a case
            without ``case_id`` or ``status``, an output path leaving the folder, a QC record of the wrong shape ...).
    """
    from medseg.fsutil import read_json

    hint = "run `medseg predict` again into this folder (--resume keeps complete cases)"
    data = read_json(path, "PREDICTION_DIR_INVALID", "manifest", hint)
    try:
        record = _Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "top level"
        raise InputError("PREDICTION_DIR_INVALID", f"{path.name} is not a prediction manifest: {where}: {err['msg']}",
                         hint) from None
    out = dict(data)
    out["cases"] = [case.model_dump(exclude_unset=False) for case in record.cases]
    return out


def read_manifests(out_dir: Path) -> tuple[list[dict], list[str]]:
    """Every case entry of a prediction folder's manifests (``manifest.json`` and shard manifests) and the model
    folder names they record.

    Raises:
        InputError: ``PREDICTION_DIR_INVALID`` when a manifest cannot be read (see :func:`read_manifest`).
    """
    cases: list[dict] = []
    models: list[str] = []
    for path in sorted(Path(out_dir).glob("manifest*.json")):
        record = read_manifest(path)
        cases += record["cases"]
        models = models or [str(m) for m in record.get("model", [])]
    return cases, models


def qc_records(out_dir: Path) -> dict[str, dict]:
    """The QC verdict, score and reason codes ``medseg predict`` recorded per case in a prediction folder (empty
    when it has no readable manifest: that only costs the evaluation report its QC figure)."""
    from medseg.errors import MedsegError

    try:
        entries, _ = read_manifests(out_dir)
    except MedsegError:
        return {}
    return {c["case_id"]: {"verdict": c["qc"]["verdict"], "score": c["qc"]["score"],
                           "reasons": [r["code"] for r in c["qc"]["reasons"]]}
            for c in entries if c.get("qc")}


def case_from_record(record: dict) -> CaseResult:
    """A :class:`CaseResult` from a validated manifest entry (fields this version does not know are dropped)."""
    known = set(CaseResult.__dataclass_fields__)
    return CaseResult(**{k: v for k, v in record.items() if k in known})
