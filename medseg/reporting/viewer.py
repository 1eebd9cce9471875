"""Interactive volume viewers in the HTML reports: NiiVue (WebGL) with the segmentation overlaid, offline.

Each case a report shows has a viewer file (:mod:`medseg.inference.viewer_file`: the region of interest, reduced,
8-bit, with its exact affine and "jump to" marks). The report embeds its NIfTI files (gzip, base64) and the NiiVue
script in the one HTML file, as text that is only decoded when a viewer is opened: the page stays one
self-contained file that opens from disk with no server (a browser does not let a page opened from disk read the
files beside it), and it is usable at once. NiiVue comes from npm's ``@niivue/niivue`` installed by
``make install`` (``package.json``); without it (the page says so), in ``--static`` reports, and in a browser
without WebGL2 (a one-line notice) the reports show their static figures only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zipfile
from pathlib import Path

from medseg.errors import describe
from medseg.inference.outputs import preview_colour
from medseg.inference.viewer_file import MARGIN_MM, MAX_AXIS, read_viewer
from medseg.reporting.overlays import PRED_COLOUR, REF_COLOUR

#: Evaluation viewers: label k of the reference takes REF_SHADES[(k - 1) % 3], of the prediction PRED_SHADES[...]
#: (the Okabe-Ito palette split into cool and warm colours, so structures differ as well as sources).
REF_SHADES = (REF_COLOUR, "#56B4E9", "#009E73")
PRED_SHADES = (PRED_COLOUR, "#D55E00", "#CC79A7")
#: Window/level presets (level, width) of CT images in HU; other images get "auto" (their robust range).
CT_PRESETS = {"soft tissue": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0)}
NIIVUE_PATH_ENV = "MEDSEG_NIIVUE_JS"
log = logging.getLogger(__name__)


def niivue_path() -> Path | None:
    """NiiVue's browser bundle (``dist/niivue.umd.js`` of npm's ``@niivue/niivue``), or None when it is not
    installed: ``$MEDSEG_NIIVUE_JS`` (a path to the bundle), then the ``node_modules`` folder ``make install`` fills
    beside this package."""
    candidates = [Path(os.environ[NIIVUE_PATH_ENV])] if os.environ.get(NIIVUE_PATH_ENV) else []
    candidates.append(Path(__file__).resolve().parents[2] / "node_modules" / "@niivue" / "niivue" / "dist" / "niivue.umd.js")
    return next((path for path in candidates if path.is_file()), None)


def niivue_script() -> tuple[str, str] | None:
    """``(source, version)`` of NiiVue's browser bundle (:func:`niivue_path`), or None when it is not installed."""
    path = niivue_path()
    if path is None:
        return None
    version = "unknown"
    package = path.parent.parent / "package.json"
    if package.is_file():
        try:
            version = str(json.loads(package.read_text(encoding="utf-8")).get("version", "unknown"))
        except (OSError, ValueError):
            pass
    source = path.read_text(encoding="utf-8")
    # inside <script type="text/plain"> only "</script" ends the element; in JS "<\/" is the same text
    return source.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT"), version


def case_viewer(path: Path, scheme: str, window: tuple[float, float] | None = None) -> dict:
    """What the report template needs for one case's viewer, from its viewer file.

    Args:
        path: The ``*.viewer.npz`` file.
        scheme: ``evaluation`` (reference blue, prediction orange, as the overlay figures) or ``prediction``
            (one colour per label, as the previews).
        window: The default display window (``evaluate --window``); else CT soft tissue, or the image's own range.
    """
    try:
        data = read_viewer(path)
        meta = data["meta"]
        if not {"labels", "marks", "modality", "auto_window", "volumes"} <= set(meta):
            raise KeyError("the description lacks keys")
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        log.warning("viewer file %s is unreadable (%s): the report shows its figure only", path.name, describe(exc))
        return {"error": f"{path.parent.name}/{path.name} is unreadable; run the command that wrote it again"}
    labels = {int(k): v for k, v in meta["labels"].items()}
    if scheme == "evaluation":
        shades = {"reference": REF_SHADES, "prediction": PRED_SHADES}
        roles = [(r, c) for r, c in (("reference", REF_COLOUR), ("prediction", PRED_COLOUR)) if r in data["volumes"]]
        colours = {r: {k: shades[r][(k - 1) % len(shades[r])] for k in labels} for r, _ in roles}
        rows = [(k, name, [colours[r][k] for r, _ in roles]) for k, name in sorted(labels.items())]
    else:
        tab = {k: preview_colour(k) for k in sorted(labels) if k > 0}
        roles, colours = [], {"prediction": tab}
        rows = [(k, name, [tab[k]]) for k, name in sorted(labels.items())]
    if window is None:
        level, width = CT_PRESETS["soft tissue"]
        window = (level - width / 2, level + width / 2) if meta["modality"] == "CT" else tuple(meta["auto_window"])
    payload = {"volumes": data["volumes"], "labels": {str(k): v for k, v in labels.items()},
               "colours": {r: {str(k): c for k, c in cs.items()} for r, cs in colours.items()},
               "window": [float(window[0]), float(window[1])]}
    n_bytes = sum(len(v) for v in data["volumes"].values())
    return {"payload": payload, "roles": roles, "labels": rows, "marks": meta["marks"], "modality": meta["modality"],
            "auto_window": meta["auto_window"], "uncertainty": "uncertainty" in data["volumes"],
            "size": f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 100_000 else f"{math.ceil(n_bytes / 1e3)} kB"}


def template_globals(static: bool) -> dict:
    """The report templates' viewer settings: the NiiVue bundle (None for ``--static`` reports or when it is not
    installed, with the reason shown on the page)."""
    lib = None if static else niivue_script()
    missing = None
    if not static and lib is None:
        missing = ("NiiVue is not installed (`make install` installs npm's @niivue/niivue; or set "
                   f"{NIIVUE_PATH_ENV} to its dist/niivue.umd.js). The static figures are shown.")
    return {"viewer_lib": {"source": lib[0], "version": lib[1]} if lib else None, "viewer_missing": missing,
            "presets": CT_PRESETS, "margin_mm": MARGIN_MM, "max_axis": MAX_AXIS}
