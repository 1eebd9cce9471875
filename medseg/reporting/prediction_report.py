"""``review.html``: the review-first report of a prediction folder (no reference needed).

Cases are listed with ``review`` first, lowest QC score first, with the reasons in plain language, the volume
of every label, and the case's three-plane preview (``predict --preview``; with ``--save-uncertainty`` the
preview's second row is the uncertainty map). The model's identity (folder name, weights hash, config hash)
comes from ``provenance.json``. One self-contained file: figures are embedded.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from medseg.errors import InputError, require_exists
from medseg.fsutil import versions
from medseg.inference.runner import read_manifests

REVIEW_REPORT = "review.html"


def is_prediction_dir(folder: Path) -> bool:
    """True for a folder written by ``medseg predict`` (a manifest, no evaluation files)."""
    return any(folder.glob("manifest*.json")) and not (folder / "evaluation.json").is_file()


def build_prediction_report(pred_dir: str | Path) -> dict:
    """Everything ``review.html`` shows: cases sorted for review, their reasons, volumes and previews."""
    pred_dir = Path(pred_dir)
    require_exists(pred_dir, "prediction folder")
    if not any(pred_dir.glob("manifest*.json")):
        raise InputError("PREDICTION_DIR_INVALID", f"{pred_dir.name} has no manifest.json",
                         "pass a folder written by `medseg predict`")
    cases, models = read_manifests(pred_dir)
    provenance = {}
    for path in sorted(pred_dir.glob("provenance*.json")):
        provenance = json.loads(path.read_text(encoding="utf-8"))
        break
    rows = []
    for c in cases:
        qc = c.get("qc") or {}
        preview = (c.get("outputs") or {}).get("preview")
        png = (pred_dir / preview["file"]).read_bytes() if preview and (pred_dir / preview["file"]).is_file() else None
        volumes = c.get("volumes_ml") or (qc.get("signals") or {}).get("volumes_ml") or {}
        rows.append({"case": c["case_id"], "status": c["status"], "verdict": qc.get("verdict", "–" if c["status"] == "ok" else c["status"]),
                     "score": qc.get("score"), "reasons": [r["text"] for r in qc.get("reasons", [])],
                     "codes": [r["code"] for r in qc.get("reasons", [])], "volumes": volumes, "png": png,
                     "error": c.get("error")})
    order = {"failed": 0, "review": 1, "ok": 3}
    rows.sort(key=lambda r: (order.get(r["verdict"], 2), r["score"] if r["score"] is not None else 2.0, r["case"]))
    labels = sorted({name for r in rows for name in r["volumes"]})
    identity = [{"name": m.get("dir"), "weights": (m.get("weights_sha256") or m.get("network_sha256") or "")[:12],
                 "config": m.get("config_hash"), "format": m.get("format")} for m in provenance.get("models", [])]
    return {
        "title": "Segmentation review",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(),
        "folder": pred_dir.resolve().name,
        "models": identity or [{"name": n, "weights": "", "config": None, "format": None} for n in models],
        "settings": provenance.get("settings", {}),
        "rows": rows,
        "labels": labels,
        "n_cases": len(rows),
        "n_review": sum(r["verdict"] == "review" for r in rows),
        "n_failed": sum(r["status"] == "failed" for r in rows),
        "n_unchecked": sum(r["status"] == "ok" and r["score"] is None for r in rows),
        "n_previews": sum(r["png"] is not None for r in rows),
    }


def write_prediction_report(pred_dir: str | Path, out: str | Path | None = None) -> Path:
    """Renders the review-first report of a prediction folder (default ``PRED_DIR/review.html``).

    Raises:
        InputError: ``PATH_NOT_FOUND``; ``PREDICTION_DIR_INVALID`` without a readable manifest.
    """
    data = build_prediction_report(pred_dir)
    env = Environment(loader=PackageLoader("medseg.reporting", "templates"), autoescape=select_autoescape())
    env.filters["b64"] = lambda raw: base64.b64encode(raw).decode()
    html = env.get_template("review.html.j2").render(**data)
    out_path = Path(out) if out else Path(pred_dir) / REVIEW_REPORT
    out_path.write_text(html, encoding="utf-8")
    return out_path
