"""``review.html``: the review-first report of a prediction folder (no reference needed).

Cases are listed with ``review`` first, lowest QC score first, with the reasons in plain language, the volume
of every label, and the case's three-plane preview (``predict --preview``; with ``--save-uncertainty`` a row of
the preview is the uncertainty map, with ``--explain`` a row the Grad-CAM saliency). The model's identity (folder name, weights hash, config hash)
comes from ``provenance.json``. One self-contained file: figures are embedded.
"""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, ValidationError

from medseg.errors import InputError, require_exists
from medseg.fsutil import atomic_write, check_output_file, versions
from medseg.inference.manifest import read_manifests
from medseg.reporting.viewer import case_viewer, template_globals

REVIEW_REPORT = "review.html"


def is_prediction_dir(folder: Path) -> bool:
    """True for a folder written by ``medseg predict`` (a manifest, no evaluation files)."""
    return any(folder.glob("manifest*.json")) and not (folder / "evaluation.json").is_file()


def build_prediction_report(pred_dir: str | Path, viewers: str = "review") -> dict:
    """Everything ``review.html`` shows: cases sorted for review, their reasons, volumes and previews, and the
    interactive viewer data of the ``review`` cases (``viewers="all"``: of every case; ``"none"``: of none)."""
    pred_dir = Path(pred_dir)
    require_exists(pred_dir, "prediction folder")
    if not any(pred_dir.glob("manifest*.json")):
        raise InputError("PREDICTION_DIR_INVALID", f"{pred_dir.name} has no manifest.json",
                         "pass a folder written by `medseg predict`")
    cases, models = read_manifests(pred_dir)
    provenance = _provenance(pred_dir)
    rows = []
    for c in cases:
        qc = c.get("qc") or {}
        preview = (c.get("outputs") or {}).get("preview")  # a path inside pred_dir (the manifest is validated)
        png = (pred_dir / preview["file"]).read_bytes() if preview and (pred_dir / preview["file"]).is_file() else None
        volumes = c.get("volumes_ml") or (qc.get("signals") or {}).get("volumes_ml") or {}
        viewer = (c.get("outputs") or {}).get("viewer")
        verdict = qc.get("verdict")
        view = None
        if viewer and (viewers == "all" or (viewers == "review" and verdict == "review")) \
                and (pred_dir / viewer["file"]).is_file():
            view = case_viewer(pred_dir / viewer["file"], "prediction")
        rows.append({"case": c["case_id"], "status": c["status"], "verdict": qc.get("verdict", "–" if c["status"] == "ok" else c["status"]),
                     "score": qc.get("score"), "reasons": [r["text"] for r in qc.get("reasons", [])],
                     "codes": [r["code"] for r in qc.get("reasons", [])], "volumes": volumes, "png": png,
                     "error": c.get("error"), "view": view})
    order = {"failed": 0, "review": 1, "ok": 3}
    rows.sort(key=lambda r: (order.get(r["verdict"], 2), r["score"] if r["score"] is not None else 2.0, r["case"]))
    labels = sorted({name for r in rows for name in r["volumes"]})
    identity = [{"name": m.dir, "weights": (m.weights_sha256 or m.network_sha256 or "")[:12],
                 "config": m.config_hash, "format": m.format,
                 "origin": m.origin} for m in provenance.models]
    return {
        "title": "Segmentation review",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(),
        "folder": pred_dir.resolve().name,
        "models": identity or [{"name": n, "weights": "", "config": None, "format": None} for n in models],
        "settings": provenance.settings.model_dump() if provenance.settings else {},
        "rows": rows,
        "labels": labels,
        "n_cases": len(rows),
        "n_review": sum(r["verdict"] == "review" for r in rows),
        "n_failed": sum(r["status"] == "failed" for r in rows),
        "n_unchecked": sum(r["status"] == "ok" and r["score"] is None for r in rows),
        "n_previews": sum(r["png"] is not None for r in rows),
    }


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")
    dir: str | None = None
    weights_sha256: str | None = None
    network_sha256: str | None = None
    config_hash: str | None = None
    format: str | None = None
    origin: str | None = None  # e.g. "nnU-Net v2 nnUNetTrainer__nnUNetPlans__3d_fullres (folds 0, 1)"


class _Settings(BaseModel):
    model_config = ConfigDict(extra="allow")
    device: str = ""
    tta: bool = False
    overlap: float | None = None


class _Provenance(BaseModel):
    model_config = ConfigDict(extra="allow")
    models: list[_Model] = []
    settings: _Settings | None = None


def _provenance(pred_dir: Path) -> _Provenance:
    """The first ``provenance*.json`` of a prediction folder, validated (an empty record when there is none).

    Raises:
        InputError: ``PREDICTION_DIR_INVALID`` when it is unreadable or not a provenance record.
    """
    from medseg.fsutil import read_json

    for path in sorted(pred_dir.glob("provenance*.json")):
        data = read_json(path, "PREDICTION_DIR_INVALID", "provenance record")
        try:
            return _Provenance.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise InputError("PREDICTION_DIR_INVALID", f"{path.name} is not a provenance record: "
                             f"{'.'.join(str(p) for p in err['loc']) or 'top level'}: {err['msg']}") from None
    return _Provenance()


def write_prediction_report(pred_dir: str | Path, out: str | Path | None = None, static: bool = False,
                            all_viewers: bool = False) -> Path:
    """Renders the review-first report of a prediction folder (default ``PRED_DIR/review.html``), with an
    interactive viewer for every ``review`` case (``all_viewers``: every case; ``static``: none) whose viewer file
    ``predict --preview`` wrote.

    Raises:
        InputError: ``PATH_NOT_FOUND``; ``PREDICTION_DIR_INVALID`` without a readable manifest.
    """
    viewer = template_globals(static)
    data = build_prediction_report(pred_dir, "none" if viewer["viewer_lib"] is None else "all" if all_viewers else "review")
    env = Environment(loader=PackageLoader("medseg.reporting", "templates"), autoescape=select_autoescape(["html.j2"]))
    env.filters["b64"] = lambda raw: base64.b64encode(raw).decode()
    html = env.get_template("review.html.j2").render(**data, **viewer, all_viewers=all_viewers)
    out_path = check_output_file(Path(out) if out else Path(pred_dir) / REVIEW_REPORT)
    atomic_write(out_path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
    return out_path
