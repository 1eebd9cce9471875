"""``report.html`` (one self-contained file, figures embedded) and ``report.pdf`` from an evaluation folder."""

from __future__ import annotations

import base64
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from medseg.errors import InputError
from medseg.fsutil import atomic_write, check_output_file, versions, write_json
from medseg.inference.viewer_file import evaluation_marks, write_viewer
from medseg.io.readers import files_by_id, read_volume
from medseg.io.volume import Volume
from medseg.metrics.aggregate import subgroups
from medseg.metrics.catalogue import METRICS
from medseg.reporting import figures
from medseg.reporting.overlays import PRED_COLOUR, REF_COLOUR, overlay_2d, overlay_3d
from medseg.reporting.records import Overlays, load_evaluation, read_json_record
from medseg.reporting.viewer import case_viewer, template_globals

MAX_FLAGGED_OVERLAYS = 40  # default of evaluation.report_max_flagged_overlays (evaluations written before it)
THICKNESS_BINS_MM = (2.5, 5.0)  # default of evaluation.report_slice_thickness_bins_mm


def _load(eval_dir: Path) -> tuple[list[dict], dict, dict]:
    return load_evaluation(Path(eval_dir))


def flag_rows(rows: list[dict], settings: dict) -> None:
    """Adds ``flags`` (list of short texts) to each row, following the evaluation settings."""
    for label in {r["label"] for r in rows}:
        mine = [r for r in rows if r["label"] == label]
        dices = np.array([r["dice"] for r in mine if math.isfinite(r["dice"])])
        worst = float(np.quantile(dices, settings["flag_worst_fraction"])) if dices.size else -1.0
        for r in mine:
            flags = []
            if math.isfinite(r["dice"]) and r["dice"] < settings["flag_dice_below"]:
                flags.append(f"Dice < {settings['flag_dice_below']}")
            if dices.size > 1 and math.isfinite(r["dice"]) and r["dice"] <= worst:
                flags.append(f"worst {settings['flag_worst_fraction']:.0%}")
            if r["vol_pred_ml"] == 0 and r["vol_ref_ml"] > 0:
                flags.append("missed: empty prediction")
            if r["vol_pred_ml"] > 0 and r["vol_ref_ml"] == 0:
                flags.append("false structure: empty reference")
            if math.isfinite(r["vol_err_pct"]) and abs(r["vol_err_pct"]) > settings["flag_volume_error_pct"]:
                flags.append(f"volume error > {settings['flag_volume_error_pct']:g}%")
            if r["touches_border"]:
                flags.append("touches image border")
            r["flags"] = flags


def _case_scores(rows: list[dict]) -> dict[str, float]:
    scores: dict[str, list[float]] = {}
    for r in rows:
        if math.isfinite(r["dice"]):
            scores.setdefault(r["case"], []).append(r["dice"])
    return {case: float(np.mean(v)) for case, v in scores.items()}


def pick_overlay_cases(rows: list[dict]) -> list[tuple[str, str]]:
    """Best, median and worst case by mean Dice over labels, then every flagged case: ``[(case, why)]``."""
    scores = sorted(_case_scores(rows).items(), key=lambda kv: kv[1])
    picked: dict[str, str] = {}
    if scores:
        picked[scores[-1][0]] = "best"
        picked.setdefault(scores[len(scores) // 2][0], "median")
        picked.setdefault(scores[0][0], "worst")
    for r in rows:
        if r["flags"] and r["case"] not in picked:
            picked[r["case"]] = "flagged"
    return list(picked.items())


def _slice_thickness_group(spacing: list[float], edges: list[float] | tuple[float, ...] = THICKNESS_BINS_MM) -> str:
    """The slice-thickness subgroup of a case: ``< a mm``, ``a–b mm`` ... ``> z mm`` for the sorted ``edges``."""
    z, edges = spacing[2], sorted(edges)
    if not edges:
        return "all"
    if z < edges[0]:
        return f"< {edges[0]:g} mm"
    for lo, hi in zip(edges, edges[1:]):
        if z <= hi:
            return f"{lo:g}–{hi:g} mm"
    return f"> {edges[-1]:g} mm"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _n(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``, or a dash when it is undefined (None, NaN)."""
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def _sentences(name: str, s: dict, unit: str, ci: float) -> list[str]:
    dice, nsd, hd95, vol = s["dice"], s["nsd"], s["hd95"], s["vol_err_pct"]
    if dice["mean"] is None:
        return [f"No case has a {name} in the reference or the prediction."]
    out = [
        f"Across {dice['n']} case(s), the predicted {name} overlapped the reference with a mean Dice of "
        f"{_n(dice['mean'], '.2f')} ({ci:.0%} CI {_n(dice['ci_low'], '.2f')} to {_n(dice['ci_high'], '.2f')}; "
        "1 is perfect)."
    ]
    if hd95["median"] is not None:
        out.append(
            f"Typically 95% of the predicted boundary lay within {_n(hd95['median'], '.1f')} mm of the reference "
            f"boundary (median HD95), and {_n(nsd['mean'], '.0%')} of boundary points were within the tolerance (NSD)."
        )
    if vol["mean"] is not None:
        out.append(f"Predicted volumes differed from the reference by {_n(vol['mean'], '+.0f')}% on average "
                   f"(median {_n(vol['median'], '+.0f')}%).")
    pooled = s["lesions_pooled"]
    if pooled["n_ref"]:
        out.append(
            f"{pooled['detected']} of {pooled['n_ref']} separate reference {name} region(s) were detected; "
            f"there were {_n(pooled['fp_per_case'], '.1f')} false-positive region(s) per case."
        )
    return out


def _read_case(paths: dict[str, Path], case: str) -> np.ndarray | None:
    return read_volume(paths[case]).array if case in paths else None


OVERLAYS = "overlays"  # folder of the evaluation holding the report's case figures (overlays.json + PNGs)


def _uncertainty(pred_dir: Path, case: str, grid: Volume) -> np.ndarray | None:
    """The case's uncertainty map (uint8 0..255 for 0..1) that ``predict --save-uncertainty`` wrote into the
    prediction folder, when it is there and on the reference's grid (for the viewer's second overlay)."""
    path = pred_dir / "uncertainty" / f"{case}.nii.gz"
    if not path.is_file():
        return None
    volume = read_volume(path)
    return np.clip(np.rint(volume.array[0] * 255.0), 0, 255).astype(np.uint8) if volume.same_grid(grid) else None


def write_overlays(eval_dir: str | Path, pred_dir: Path, ref_dir: Path, images_dir: Path | None = None) -> None:
    """Draws the report's case figures (best, median, worst and flagged cases) into ``eval_dir/overlays/``, after
    :func:`medseg.metrics.evaluate.evaluate_folders` and while the label (and image) files are at hand, so the
    evaluation folder alone renders its report (``medseg report`` anywhere) and records no input path.
    """
    eval_dir = Path(eval_dir)
    refs, preds = files_by_id(ref_dir), files_by_id(pred_dir)
    images = files_by_id(images_dir) if images_dir else {}
    rows, _, record = _load(eval_dir)
    settings = record["settings"]
    labels = {int(k): v for k, v in record["labels"].items()}
    window = tuple(record["window"]) if record.get("window") else None
    flag_rows(rows, settings)
    picks = pick_overlay_cases(rows)
    max_flagged = int(settings.get("report_max_flagged_overlays", MAX_FLAGGED_OVERLAYS))
    flagged_total = sum(1 for _, why in picks if why == "flagged")
    folder = eval_dir / OVERLAYS
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    entries = []
    for k, (case, why) in enumerate([p for p in picks if p[1] != "flagged"] + [p for p in picks if p[1] == "flagged"][:max_flagged]):
        ref_vol = read_volume(refs[case])
        pred_arr = read_volume(preds[case]).array[0]
        image = _read_case(images, case)
        viewer_file = None
        if len(ref_vol.spatial_shape) == 3:
            png, caption = overlay_3d(
                None if image is None else image[0].astype(np.float32), ref_vol.array[0], pred_arr, ref_vol.affine,
                labels, window,
            )
            viewer_file = f"{k:03d}.viewer.npz"
            marks = evaluation_marks(ref_vol.array[0], pred_arr, ref_vol.affine, labels, settings["lesion_overlap"])
            write_viewer(folder / viewer_file, None if image is None else image[0], ref_vol.affine,
                         {"reference": ref_vol.array[0], "prediction": pred_arr}, labels, marks,
                         _uncertainty(pred_dir, case, ref_vol))
        else:
            png, caption = overlay_2d(image, ref_vol.array[0], pred_arr, labels)
        name = f"{k:03d}.png"
        (folder / name).write_bytes(png)
        case_flags = sorted({f"{r['label']}: {f}" for r in rows if r["case"] == case for f in r["flags"]})
        entries.append({"case": case, "why": why, "file": name, "caption": caption, "flags": case_flags,
                        "viewer": viewer_file})
    write_json(folder / "overlays.json", {"overlays": entries, "flagged_not_shown": max(0, flagged_total - max_flagged)})


def _read_overlays(eval_dir: Path, viewers: bool = False, window: tuple[float, float] | None = None) -> tuple[list[dict], int]:
    path = eval_dir / OVERLAYS / "overlays.json"
    if not path.is_file():
        raise InputError("EVAL_DIR_INVALID", f"{eval_dir.name} lacks {OVERLAYS}/overlays.json",
                         "run `medseg evaluate` again to create it")
    record = read_json_record(path, Overlays)
    overlays = []
    for o in record.overlays:
        figure = eval_dir / OVERLAYS / o.file
        if not figure.is_file():
            raise InputError("EVAL_DIR_INVALID", f"{OVERLAYS}/{o.file} (listed in overlays.json) is missing",
                             "run `medseg evaluate` again to create it")
        viewer = None
        if viewers and o.viewer and (eval_dir / OVERLAYS / o.viewer).is_file():
            viewer = case_viewer(eval_dir / OVERLAYS / o.viewer, "evaluation", window)
        overlays.append({**o.model_dump(), "png": figure.read_bytes(), "view": viewer})
    return overlays, record.flagged_not_shown


def build_report(eval_dir: str | Path, viewers: bool = False) -> dict:
    """Everything the HTML and PDF show, with figures as PNG bytes (and, with ``viewers``, each shown case's
    interactive viewer data, :func:`medseg.reporting.viewer.case_viewer`)."""
    eval_dir = Path(eval_dir)
    rows, summary, record = _load(eval_dir)
    settings = record["settings"]
    labels = {int(k): v for k, v in record["labels"].items()}
    names = list(labels.values())
    unit = record["units"]["volume"]
    flag_rows(rows, settings)
    window = tuple(record["window"]) if record.get("window") else None
    overlays, flagged_not_shown = _read_overlays(eval_dir, viewers, window)

    case_meta = {case: dict(info.get("metadata", {})) for case, info in record["cases"].items()}
    for case, info in record["cases"].items():
        if info["dims"] == 3:
            case_meta[case]["slice thickness"] = _slice_thickness_group(
                info["spacing"], settings.get("report_slice_thickness_bins_mm", THICKNESS_BINS_MM))
    groups = subgroups(rows, case_meta, names, "dice", settings["small_subgroup"], settings["bootstrap"], settings["ci_level"])

    figs = [("Metric distributions", figures.distributions(rows, names))]
    figs += [(f"Volume agreement: {name}", figures.volume_agreement(rows, name, unit)) for name in names]
    if record.get("qc"):
        figs.append(("QC score (from medseg predict, no reference) against the true Dice: a useful score puts the "
                     "low-Dice cases at its low end", figures.qc_against_dice(rows, record["qc"], names)))
    return {
        "card_metrics": [(m.name, m.title) for m in METRICS.values() if m.card and m.name in summary[names[0]]]
        if names else [],
        "title": "Segmentation evaluation report",
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(),
        "context": record.get("context", {}),
        "n_cases": len(record["cases"]),
        "labels": names,
        "unit": unit,
        "settings": settings,
        "cards": {name: _sentences(name, summary[name], unit, settings["ci_level"]) for name in names},
        "summary": summary,
        "rows": rows,
        "figures": figs,
        "overlays": overlays,
        "flagged_not_shown": flagged_not_shown,
        "subgroups": groups,
        "window": window,
    }


def write_report(eval_dir: str | Path, out: str | Path | None = None, pdf: bool = True, static: bool = False) -> Path:
    """Renders ``report.html`` (and ``report.pdf`` beside it) for an evaluation folder.

    Args:
        eval_dir: Folder written by :func:`medseg.metrics.evaluate.evaluate_folders`.
        out: HTML path (default ``eval_dir/report.html``).
        pdf: Also write the PDF version (same name, ``.pdf``).
        static: Figures only, without the interactive viewers (:mod:`medseg.reporting.viewer`).

    Returns:
        The HTML path.

    Raises:
        InputError: ``PATH_NOT_FOUND``; ``EVAL_DIR_INVALID`` when the evaluation files are missing.
    """
    viewer = template_globals(static)
    data = build_report(eval_dir, viewers=viewer["viewer_lib"] is not None)
    env = Environment(loader=PackageLoader("medseg.reporting", "templates"), autoescape=select_autoescape(["html.j2"]))
    env.filters["b64"] = lambda raw: base64.b64encode(raw).decode()
    env.filters["num"] = _fmt
    html = env.get_template("report.html.j2").render(**data, **viewer, ref_colour=REF_COLOUR, pred_colour=PRED_COLOUR)
    out_path = check_output_file(Path(out) if out else Path(eval_dir) / "report.html")
    atomic_write(out_path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
    if pdf:
        from medseg.reporting.pdf import write_pdf

        write_pdf(data, out_path.with_suffix(".pdf"))
    return out_path
