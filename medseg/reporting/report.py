"""``report.html``: one self-contained file (figures embedded) from an evaluation folder."""

from __future__ import annotations

import base64
import csv
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

import medseg
from medseg.errors import InputError, require_exists
from medseg.io.nifti import nifti_files_by_id, read_nifti
from medseg.reporting.figures import PRED_COLOUR, REF_COLOUR, axial_overlay_png


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def write_report(eval_dir: str | Path, out: str | Path | None = None) -> Path:
    """Renders the report of an evaluation folder written by :func:`medseg.metrics.evaluate.evaluate_folders`.

    Args:
        eval_dir: Folder with ``metrics.csv``, ``summary.json`` and ``evaluation.json``.
        out: Output HTML path (default ``eval_dir/report.html``).

    Returns:
        The written path.

    Raises:
        InputError: ``PATH_NOT_FOUND``; ``EVAL_DIR_INVALID`` when the evaluation files are missing.
    """
    eval_dir = Path(eval_dir)
    require_exists(eval_dir, "evaluation folder")
    needed = ("metrics.csv", "summary.json", "evaluation.json")
    missing = [n for n in needed if not (eval_dir / n).is_file()]
    if missing:
        raise InputError(
            "EVAL_DIR_INVALID", f"{eval_dir} lacks {', '.join(missing)}", "run `medseg evaluate` to create it"
        )
    with open(eval_dir / "metrics.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    summary = json.loads((eval_dir / "summary.json").read_text(encoding="utf-8"))
    record = json.loads((eval_dir / "evaluation.json").read_text(encoding="utf-8"))
    labels = {int(k): v for k, v in record["labels"].items()}
    window = tuple(record["window"]) if record.get("window") else None

    cases = []
    refs = nifti_files_by_id(Path(record["ref_dir"]))
    preds = nifti_files_by_id(Path(record["pred_dir"]))
    images = nifti_files_by_id(Path(record["images_dir"])) if record.get("images_dir") else {}
    for case_id in record["cases"]:
        ref = read_nifti(refs[case_id])
        pred = read_nifti(preds[case_id])
        image = read_nifti(images[case_id]).array[0].astype(np.float32) if case_id in images else None
        png, caption = axial_overlay_png(image, ref.array[0], pred.array[0], ref.affine, labels, window)
        case_rows = [r for r in rows if r["case"] == case_id]
        cases.append(
            {
                "id": case_id,
                "rows": [{k: (_float(v) if k not in ("case", "label") else v) for k, v in r.items()} for r in case_rows],
                "figure": base64.b64encode(png).decode(),
                "caption": caption,
            }
        )
    env = Environment(loader=PackageLoader("medseg.reporting", "templates"), autoescape=select_autoescape())
    html = env.get_template("report.html.j2").render(
        title="Segmentation evaluation report",
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=medseg.__version__,
        context=record.get("context", {}),
        n_cases=len(record["cases"]),
        labels=labels,
        summary=summary,
        cases=cases,
        ref_colour=REF_COLOUR,
        pred_colour=PRED_COLOUR,
    )
    out_path = Path(out) if out else eval_dir / "report.html"
    out_path.write_text(html, encoding="utf-8")
    return out_path
