"""The evaluation report with interactive viewers at CT size: its size and how soon it is usable, against the
``--static`` report of the same evaluation measured in the same run.

20 cases of a 512 x 512 x 300 CT (0.78 mm pixels, 1.5 mm slices, int16 HU: air, a body with 12 HU noise, a
liver-sized organ, lesions), each flagged (the prediction's organ is 30 % too large) so the report shows all 20.
Timed: ``evaluate`` + ``write_overlays`` (figures and viewer files; the viewer files' own share separately), the
HTML of both reports, then in headless Chromium (Debian's, software WebGL): the page's load event (usable: the
table, figures and buttons), and the time from pressing the first case's "Open interactive viewer" to its first
rendered frame.

    .venv/bin/python benchmarks/report_viewer.py [--cases 20] [--slices 300]
    .venv/bin/python benchmarks/report_viewer.py --cases 3 --slices 160 --screenshot docs/images/report-viewer.png

(``--screenshot`` saves the first viewer, opened and moved to its first "jump to" entry, instead of the results.)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save

from medseg.inference import viewer_file
from medseg.metrics.evaluate import evaluate_folders
from medseg.reporting import report as report_module
from medseg.reporting.report import write_overlays, write_report

SPACING = (0.78, 0.78, 1.5)


def phantom(seed: int, slices: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image int16 HU, reference, prediction) of one case."""
    rng = np.random.default_rng(seed)
    x, y = np.mgrid[:512, :512].astype(np.float32)
    body = ((x - 256) / 210) ** 2 + ((y - 256) / 160) ** 2 < 1
    cx, cy = 200 + rng.uniform(-10, 10), 230 + rng.uniform(-10, 10)
    image = np.full((512, 512, slices), -1000, np.int16)
    ref = np.zeros((512, 512, slices), np.uint8)
    half = slices * 0.3
    for k in range(slices):
        t = (k - slices / 2) / half
        image[..., k][body] = 40
        if abs(t) < 1:
            r = np.sqrt(1 - t * t)
            ref[..., k][((x - cx) / (95 * r)) ** 2 + ((y - cy) / (75 * r)) ** 2 < 1] = 1
    for _ in range(6):  # lesions, 5-12 mm
        px, py, pz = rng.uniform([cx - 50, cy - 40, slices * 0.4], [cx + 50, cy + 40, slices * 0.6])
        rad = rng.uniform(3.0, 8.0)
        box = (slice(int(px - 10), int(px + 11)), slice(int(py - 10), int(py + 11)), slice(int(pz - 6), int(pz + 7)))
        gx, gy, gz = np.mgrid[box]
        inside = ((gx - px) * SPACING[0]) ** 2 + ((gy - py) * SPACING[1]) ** 2 + ((gz - pz) * SPACING[2]) ** 2 < rad ** 2
        ref[box][inside] = 2
    image[ref == 1] = 100
    image[ref == 2] = 60
    image += np.where(image > -500, rng.normal(0, 12, image.shape), rng.normal(0, 4, image.shape)).astype(np.int16)
    pred = ref.copy()
    from scipy import ndimage

    grown = ndimage.binary_dilation(ref == 1, iterations=4)
    pred[grown & (pred == 0)] = 1
    return image, ref, pred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--screenshot", type=Path, default=None)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    affine = np.diag([*SPACING, 1.0])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for folder in ("img", "ref", "pred"):
            (root / folder).mkdir()
        t = time.perf_counter()
        for i in range(args.cases):
            image, ref, pred = phantom(i, args.slices)
            for folder, data in (("img", image), ("ref", ref), ("pred", pred)):
                nib.save(nib.Nifti1Image(data, affine), root / folder / f"case_{i:02d}.nii.gz")
        make_s = time.perf_counter() - t

        t = time.perf_counter()
        evaluate_folders(root / "pred", root / "ref", root / "eval", labels={1: "liver", 2: "lesion"})
        evaluate_s = time.perf_counter() - t
        spent = [0.0]
        original = report_module.write_viewer

        def timed(*a, **k):
            s = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[0] += time.perf_counter() - s

        report_module.write_viewer = timed
        t = time.perf_counter()
        write_overlays(root / "eval", root / "pred", root / "ref", root / "img")
        overlays_s = time.perf_counter() - t
        report_module.write_viewer = original
        viewer_files = sorted((root / "eval" / "overlays").glob("*.viewer.npz"))

        t = time.perf_counter()
        html = write_report(root / "eval", root / "interactive.html", pdf=False)
        html_s = time.perf_counter() - t
        t = time.perf_counter()
        static = write_report(root / "eval", root / "static.html", pdf=False, static=True)
        static_s = time.perf_counter() - t
        meta = viewer_file.read_viewer(viewer_files[0])["meta"]
        from medseg.reporting.viewer import niivue_script

        lib = niivue_script()
        embedded = sum(len(v) for f in viewer_files for v in viewer_file.read_viewer(f)["volumes"].values())
        sizes = {"interactive_html": round(html.stat().st_size / 1e6, 2), "static_html": round(static.stat().st_size / 1e6, 2),
                 "niivue_script": round(len(lib[0]) / 1e6, 2) if lib else None,
                 "viewer_data_per_case": round(embedded / max(len(viewer_files), 1) / 1e6, 2),
                 "ratio_interactive_to_static": round(html.stat().st_size / static.stat().st_size, 1)}

        browser: dict = {"chromium": chromium}
        if chromium:
            from playwright import sync_api

            with sync_api.sync_playwright() as p:
                b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                for name, path in (("static", static), ("interactive", html)):
                    loads = []
                    for _ in range(3):
                        page = b.new_page(viewport={"width": 1200, "height": 900})
                        t = time.perf_counter()
                        page.goto(path.as_uri(), wait_until="load")
                        loads.append(time.perf_counter() - t)
                        if name == "interactive" and len(loads) == 3:
                            v = page.locator(".viewer").first
                            t = time.perf_counter()
                            v.locator(".viewer-open").click()
                            page.wait_for_function("el => el.dataset.state !== 'loading'", arg=v.element_handle(),
                                                   timeout=120_000)
                            page.evaluate("() => new Promise(r => requestAnimationFrame(() => r()))")
                            browser["first_viewer_render_s"] = round(time.perf_counter() - t, 3)
                            browser["first_viewer_state"] = v.get_attribute("data-state")
                            if args.screenshot:
                                v.locator(".v-jump").first.click()
                                page.wait_for_timeout(300)
                                v.screenshot(path=str(args.screenshot))
                            browser["first_viewer_ms"] = page.evaluate(
                                "el => Object.fromEntries(Object.entries(el.timings).map(([k, v]) => [k, Math.round(v)]))",
                                v.element_handle())
                        page.close()
                    browser[f"{name}_load_s"] = round(float(np.median(loads)), 3)
                b.close()
            browser["load_ratio_interactive_to_static"] = round(browser["interactive_load_s"] / browser["static_load_s"], 2)

    result = {
        "machine": machine(),
        "cases": args.cases, "shape": [512, 512, args.slices], "spacing_mm": list(SPACING),
        "viewed_cases": len(viewer_files),
        "embedded_grid": meta["shape"], "block_factors": meta["factors"],
        "seconds": {"make_data": round(make_s, 1), "evaluate": round(evaluate_s, 1),
                    "figures_and_viewer_files": round(overlays_s, 1), "viewer_files_only": round(spent[0], 1),
                    "interactive_html": round(html_s, 2), "static_html": round(static_s, 2)},
        "sizes_mb": sizes,
        "browser": browser,
    }
    if args.screenshot:
        print(f"screenshot: {args.screenshot}")
        return
    save("report_viewer", result)


if __name__ == "__main__":
    main()
