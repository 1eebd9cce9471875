"""The reports' interactive viewers (NiiVue, WebGL) in headless Chromium, with every request but ``file:`` blocked:
each viewer renders, scrolls (wheel and keys), changes window and opacity, hides one label's pixels only, jumps
to the structures (centroids found independently with scikit-image on the input files) and puts a marked voxel
of a flipped and of an oblique input where the input's NIfTI affine says (nibabel). `.ci/run` installs Chromium
and, through `make install`, NiiVue."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from skimage.measure import label as sk_label
from skimage.measure import regionprops

from medseg.metrics.evaluate import evaluate_folders
from medseg.reporting.report import write_overlays, write_report
from medseg.reporting.viewer import niivue_script

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run",
        "--disable-sync"]
LABELS = {1: "organ", 2: "lesion"}
MARKER = (30, 21, 9)  # a one-voxel lesion in reference and prediction of every case


def _need_browser_and_viewer() -> None:
    if CHROMIUM is None:
        if os.environ.get("MEDSEG_REQUIRE_BROWSER"):
            pytest.fail("MEDSEG_REQUIRE_BROWSER is set but chromium is not installed")
        pytest.skip("needs Debian's chromium (apt-get install chromium); .ci/run installs it")
    if niivue_script() is None:
        if os.environ.get("MEDSEG_REQUIRE_NIIVUE"):
            pytest.fail("MEDSEG_REQUIRE_NIIVUE is set but NiiVue is not installed (make install runs npm ci)")
        pytest.skip("needs npm's @niivue/niivue (make install)")


def _affines() -> dict[str, np.ndarray]:
    plain = np.diag([1.2, 1.0, 2.5, 1.0])
    flipped = np.diag([-1.2, -1.0, -2.5, 1.0])
    flipped[:3, 3] = [40.0, 30.0, 50.0]
    a, b = np.radians(25.0), np.radians(12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    oblique = np.eye(4)
    oblique[:3, :3] = rz @ rx @ np.diag([1.2, 1.0, 2.5]) @ np.diag([-1.0, 1.0, 1.0])
    oblique[:3, 3] = [-20.0, 15.0, -40.0]
    return {"plain": plain, "flipped": flipped, "oblique": oblique}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three CT-like cases (plain, flipped, oblique grids), each with an organ the prediction trims, a missed and a
    false lesion, and the marker voxel; evaluated, with the report written."""
    root = tmp_path_factory.mktemp("viewer")
    rng = np.random.default_rng(1)
    for k, (case, affine) in enumerate(_affines().items()):
        ref = np.zeros((48, 44, 20), np.uint8)
        ref[10:34, 8:36, 3:16] = 1
        pred = ref.copy()
        pred[10:13 + k, 8:36, 3:16] = 0
        ref[38:42, 30:34, 12:15] = 2  # missed
        pred[4:7, 36:40, 4:7] = 2  # false
        ref[MARKER] = pred[MARKER] = 2
        image = rng.normal(40.0, 12.0, ref.shape).astype(np.float32)
        image[ref == 1] += 80.0
        image[:, :3] = -1000.0  # air
        for folder, data in (("ref", ref), ("pred", pred), ("img", image)):
            (root / folder).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), root / folder / f"{case}.nii.gz")
        if case == "plain":  # as predict --save-uncertainty writes it: uint8 with scl_slope 1/255
            (root / "pred" / "uncertainty").mkdir()
            u = nib.Nifti1Image(np.where(ref == 1, 200, 0).astype(np.uint8), affine)
            u.header.set_slope_inter(1 / 255, 0)
            nib.save(u, root / "pred" / "uncertainty" / f"{case}.nii.gz")
    evaluate_folders(root / "pred", root / "ref", root / "eval", labels=LABELS)
    write_overlays(root / "eval", root / "pred", root / "ref", root / "img")
    write_report(root / "eval", pdf=False)
    return root


def _page(p, html: Path, blocked: list[str], args: list[str] = ARGS):
    browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
    page = browser.new_page(viewport={"width": 1200, "height": 900})

    def route(r):
        if r.request.url.startswith("file:"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(html.as_uri())
    return browser, page, errors


def _open(page, viewer) -> None:
    viewer.locator(".viewer-open").click()
    page.wait_for_function("el => el.dataset.state !== 'loading'", arg=viewer.element_handle(), timeout=60_000)
    assert viewer.get_attribute("data-state") == "ready", viewer.locator(".viewer-notice").inner_text()
    page.wait_for_timeout(200)


def _pixels(viewer) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(viewer.locator(".viewer-canvas").screenshot())).convert("RGB")).astype(int)


def _crosshair_mm(page, viewer) -> np.ndarray:
    return np.array(page.evaluate("el => Array.from(el.nv.frac2mm(el.nv.scene.crosshairPos)).slice(0, 3)",
                                  viewer.element_handle()))


def _value_at(page, viewer, mm, volume: str) -> float:
    """The value NiiVue reports for ``volume`` after the crosshair is moved to world position ``mm``."""
    return page.evaluate("""([el, mm, name]) => {
        el.nv.scene.crosshairPos = el.nv.mm2frac(mm); el.nv.drawScene(); el.nv.createOnLocationChange();
        return el.location.values.find(v => v.name === name).value; }""", [viewer.element_handle(), list(mm), volume])


def test_every_viewer_renders_offline_and_scrolls_with_wheel_and_keys(evaluated: Path):
    _need_browser_and_viewer()
    from playwright import sync_api

    html = evaluated / "eval" / "report.html"
    blocked: list[str] = []
    with sync_api.sync_playwright() as p:
        browser, page, errors = _page(p, html, blocked)
        viewers = page.locator(".viewer")
        assert viewers.count() == 3  # best, median, worst (all three cases)
        assert "research use only" in page.locator(".banner").inner_text().lower()
        assert page.evaluate("typeof window.niivue") == "undefined"  # loaded only when a viewer opens
        for i in range(3):
            v = viewers.nth(i)
            _open(page, v)
            shot = _pixels(v)
            lit = (shot.sum(axis=2) > 30).mean()
            assert lit > 0.2 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 50, (i, lit)
        v = viewers.nth(0)
        v.locator(".v-view").select_option("0")  # axial
        page.wait_for_timeout(200)
        before, z0 = _pixels(v), _crosshair_mm(page, v)
        box = v.locator(".viewer-canvas canvas").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for _ in range(3):
            page.mouse.wheel(0, 120)
            page.wait_for_timeout(100)
        after, z1 = _pixels(v), _crosshair_mm(page, v)
        assert abs(z1[2] - z0[2]) >= 2.5 and np.abs(after - before).sum(axis=2).astype(bool).mean() > 0.01
        v.locator(".viewer-canvas canvas").focus()
        page.keyboard.press("PageUp")
        page.keyboard.press("PageUp")
        page.wait_for_timeout(100)
        assert abs(_crosshair_mm(page, v)[2] - z1[2]) == pytest.approx(5.0, abs=1e-3)  # two slices of 2.5 mm
        # window presets: the image's display range follows (HU)
        v.locator(".v-preset", has_text="lung").click()
        assert page.evaluate("el => [el.nv.volumes[0].cal_min, el.nv.volumes[0].cal_max]", v.element_handle()) == [-1350, 150]
        lung = _pixels(v)
        assert np.abs(lung - after).sum() > 0
        v.locator(".v-opacity").fill("100")
        page.wait_for_timeout(100)
        assert np.abs(_pixels(v) - lung).sum() > 0
        browser.close()
    assert not blocked and not errors, (blocked, errors)


def test_jump_to_centres_each_flagged_structure(evaluated: Path):
    """Every "jump to" entry of the oblique case moves the crosshair to within one voxel of the structure's
    centroid, found with scikit-image on the input files."""
    _need_browser_and_viewer()
    from playwright import sync_api

    record = json.loads((evaluated / "eval" / "overlays" / "overlays.json").read_text())
    index = [o["case"] for o in record["overlays"]].index("oblique") + 1
    ref_img = nib.load(evaluated / "ref" / "oblique.nii.gz")
    ref = np.asarray(ref_img.dataobj)
    pred = np.asarray(nib.load(evaluated / "pred" / "oblique.nii.gz").dataobj)
    affine = ref_img.affine

    def centroids(mask):
        return [(int(r.area), nib.affines.apply_affine(affine, r.centroid)) for r in regionprops(sk_label(mask, connectivity=3))]

    expected = {
        "organ: largest disagreement": max(centroids((ref == 1) ^ (pred == 1)), key=lambda r: r[0])[1],
        "lesion: missed lesion": next(c for n, c in centroids(ref == 2) if n == 48),
        "lesion: false lesion": next(c for n, c in centroids(pred == 2) if n == 36),
    }
    blocked: list[str] = []
    with sync_api.sync_playwright() as p:
        browser, page, errors = _page(p, evaluated / "eval" / "report.html", blocked)
        v = page.locator(f"#viewer-{index}")
        _open(page, v)
        buttons = v.locator(".v-jump")
        seen = set()
        for i in range(buttons.count()):
            text = buttons.nth(i).inner_text()
            key = text.split(" (")[0]
            if key not in expected:
                continue
            buttons.nth(i).click()
            page.wait_for_timeout(100)
            delta = _crosshair_mm(page, v) - expected[key]
            in_voxels = np.linalg.solve(affine[:3, :3], delta)
            assert np.abs(in_voxels).max() <= 1.0, (key, in_voxels)
            seen.add(key)
        browser.close()
    assert seen == set(expected) and not blocked and not errors


@pytest.mark.parametrize("case", ["flipped", "oblique"])
def test_marked_voxel_sits_where_the_nifti_affine_puts_it(evaluated: Path, case: str):
    """The viewer's value at the world position nibabel gives the marker voxel is the marker's label, and at the
    world positions of its six neighbours it is not."""
    _need_browser_and_viewer()
    from playwright import sync_api

    record = json.loads((evaluated / "eval" / "overlays" / "overlays.json").read_text())
    index = [o["case"] for o in record["overlays"]].index(case) + 1
    affine = nib.load(evaluated / "ref" / f"{case}.nii.gz").affine
    blocked: list[str] = []
    with sync_api.sync_playwright() as p:
        browser, page, errors = _page(p, evaluated / "eval" / "report.html", blocked)
        v = page.locator(f"#viewer-{index}")
        _open(page, v)
        at = nib.affines.apply_affine(affine, MARKER)
        assert _value_at(page, v, at, "reference.nii.gz") == 2
        assert _value_at(page, v, at, "prediction.nii.gz") == 2
        for axis in range(3):
            for step in (-1, 1):
                neighbour = np.array(MARKER, float)
                neighbour[axis] += step
                assert _value_at(page, v, nib.affines.apply_affine(affine, neighbour), "reference.nii.gz") != 2
        browser.close()
    assert not blocked and not errors


def _review_folder(root: Path) -> Path:
    """A prediction folder as `medseg predict --preview --save-uncertainty` leaves it: two labels side by side in
    the same slices; case_a flagged for review, case_b (the same files) ok."""
    from medseg.inference.viewer_file import write_case_viewer
    from medseg.io.volume import Volume

    pred_dir = root / "pred"
    (pred_dir / "previews").mkdir(parents=True)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    image = np.full((1, 60, 50, 12), 40.0, np.float32)
    image[0, :, :4] = -1000.0
    labels = np.zeros((1, 60, 50, 12), np.uint8)
    labels[0, 8:26, 12:38, 2:10] = 1
    labels[0, 34:52, 12:38, 2:10] = 2
    uncertainty = np.zeros((1, 60, 50, 12), np.uint8)
    uncertainty[0, 20:40, 10:40, 3:9] = 200
    target = pred_dir / "previews" / "case_a.viewer.npz"
    write_case_viewer(Volume(image, affine), Volume(labels, affine), Volume(uncertainty, affine),
                      {1: "liver", 2: "spleen"}, target)
    shutil.copy(target, pred_dir / "previews" / "case_b.viewer.npz")
    manifest = {"model": ["m"], "cases": [{
        "case_id": case, "status": "ok", "qc": {"verdict": verdict, "score": score, "reasons": []},
        "outputs": {"viewer": {"file": f"previews/{case}.viewer.npz",
                               "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}}}
        for case, verdict, score in (("case_a", "review", 0.4), ("case_b", "ok", 0.9))]}
    (pred_dir / "manifest.json").write_text(json.dumps(manifest))
    return pred_dir


def test_review_viewer_label_switch_changes_that_label_colour_only(tmp_path: Path):
    """Review report: labels in the previews' tab10 colours (liver blue, spleen orange); switching liver off
    changes only pixels that showed the blue overlay; the uncertainty map switches on as a second overlay."""
    _need_browser_and_viewer()
    from playwright import sync_api

    from medseg.reporting.prediction_report import write_prediction_report

    html = write_prediction_report(_review_folder(tmp_path))
    blocked: list[str] = []
    with sync_api.sync_playwright() as p:
        browser, page, errors = _page(p, html, blocked)
        v = page.locator(".viewer")
        assert v.count() == 1  # case_a's: the one to review
        _open(page, v)
        v.locator(".v-view").select_option("0")
        v.locator(".v-opacity").fill("80")
        page.wait_for_timeout(200)
        before = _pixels(v)
        v.locator(".v-label[data-value='1']").uncheck()
        page.wait_for_timeout(200)
        after = _pixels(v)
        changed = np.abs(after - before).sum(axis=2) > 24
        blue = before[..., 2] - before[..., 0] > 40  # #1f77b4 over grey
        orange = before[..., 0] - before[..., 2] > 40  # #ff7f0e over grey
        assert changed.sum() > 2000 and blue.sum() > 2000 and orange.sum() > 2000
        assert (changed & blue).sum() / changed.sum() > 0.99  # what changed was blue
        assert (changed & orange).sum() / orange.sum() < 0.01  # the orange label stayed
        v.locator(".v-uncertainty").check()
        page.wait_for_timeout(200)
        assert (np.abs(_pixels(v) - after).sum(axis=2) > 24).sum() > 500
        v.locator(".viewer-close").click()  # closed, the controls reset; it opens again
        assert v.get_attribute("data-state") == "closed" and v.locator(".viewer-body").is_hidden()
        _open(page, v)
        assert v.locator(".v-label[data-value='1']").is_checked() and not v.locator(".v-uncertainty").is_checked()
        browser.close()
    assert not blocked and not errors


def test_without_webgl_the_figure_stays_with_a_notice(evaluated: Path):
    _need_browser_and_viewer()
    from playwright import sync_api

    blocked: list[str] = []
    with sync_api.sync_playwright() as p:
        browser, page, errors = _page(p, evaluated / "eval" / "report.html", blocked, ARGS + ["--disable-3d-apis"])
        v = page.locator(".viewer").first
        v.locator(".viewer-open").click()
        assert v.get_attribute("data-state") == "unavailable"
        assert "no WebGL2" in v.locator(".viewer-notice").inner_text()
        images = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        assert len(images) >= 3 and all(images)
        browser.close()
    assert not blocked and not errors


def test_static_report_and_missing_niivue(evaluated: Path, monkeypatch: pytest.MonkeyPatch):
    """``--static`` leaves the viewers out (the old report); without NiiVue the page says why it has none. Neither
    needs a browser."""
    from typer.testing import CliRunner

    from medseg.cli import app

    out = evaluated / "static.html"
    result = CliRunner().invoke(app, ["report", str(evaluated / "eval"), "--static", "--no-pdf", "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert 'class="viewer"' not in text and "niivue-src" not in text and "Interactive viewers are not" not in text
    monkeypatch.setattr("medseg.reporting.viewer.niivue_path", lambda: None)
    result = CliRunner().invoke(app, ["report", str(evaluated / "eval"), "--no-pdf", "-o", str(out)])
    assert result.exit_code == 0 and "NiiVue is not installed" in result.output
    text = out.read_text()
    assert 'class="viewer"' not in text and "Interactive viewers are not in this report: NiiVue is not installed" in text


def test_review_report_views_review_cases_or_all(tmp_path: Path):
    from medseg.reporting.prediction_report import write_prediction_report

    pred_dir = _review_folder(tmp_path)
    if niivue_script() is None:
        pytest.skip("needs npm's @niivue/niivue (make install)")
    assert write_prediction_report(pred_dir).read_text().count('class="viewer"') == 1
    assert write_prediction_report(pred_dir, all_viewers=True).read_text().count('class="viewer"') == 2
    assert write_prediction_report(pred_dir, static=True).read_text().count('class="viewer"') == 0


def test_evaluation_viewer_carries_the_prediction_uncertainty_when_predict_saved_it(evaluated: Path):
    from medseg.inference.viewer_file import read_viewer

    record = json.loads((evaluated / "eval" / "overlays" / "overlays.json").read_text())
    volumes = {o["case"]: read_viewer(evaluated / "eval" / "overlays" / o["viewer"])["meta"]["volumes"]
               for o in record["overlays"]}
    assert volumes == {"plain": ["image", "reference", "prediction", "uncertainty"],
                       "flipped": ["image", "reference", "prediction"], "oblique": ["image", "reference", "prediction"]}
    text = (evaluated / "eval" / "report.html").read_text()
    if niivue_script() is not None:
        assert text.count('class="v-uncertainty"') == 1
