"""Opens report.html in headless Chromium (Debian's, via Playwright): every image decodes, one table row per
case and label, sorting works, and a screenshot is saved. `.ci/run` installs chromium so this runs in CI."""

import os
import shutil
from pathlib import Path

import pytest

from medseg.inference.manifest import qc_records
from medseg.metrics.evaluate import evaluate_folders
from medseg.reporting.report import write_overlays, write_report
from medseg.reporting.viewer import niivue_script

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]


def _need_browser() -> None:
    if CHROMIUM is None:
        if os.environ.get("MEDSEG_REQUIRE_BROWSER"):
            pytest.fail("MEDSEG_REQUIRE_BROWSER is set but chromium is not installed")
        pytest.skip("needs Debian's chromium (apt-get install chromium); .ci/run installs it")


def test_report_renders_in_headless_chromium(tiny_dataset: Path, smoke_model: Path, tmp_path: Path):
    _need_browser()
    from playwright import sync_api

    from medseg.inference.predictor import Predictor
    from medseg.inference.runner import predict_folder

    predict_folder(Predictor.from_model_dir(smoke_model, "cpu"), tiny_dataset / "imagesTs", tmp_path / "pred")
    evaluate_folders(tmp_path / "pred", tiny_dataset / "labelsTs", tmp_path / "ev", labels={1: "organ", 2: "lesion"},
                     qc=qc_records(tmp_path / "pred"))
    write_overlays(tmp_path / "ev", tmp_path / "pred", tiny_dataset / "labelsTs", tiny_dataset / "imagesTs")
    html = write_report(tmp_path / "ev")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(html.as_uri())
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        assert len(images) == 5 and all(done and width > 0 for done, width in images)  # + QC score against Dice
        assert page.locator("#cases tbody tr").count() == 2  # 1 case x 2 labels
        page.locator("#cases th", has_text="label").click()
        first = page.locator("#cases tbody tr").first.locator("td").nth(1).inner_text()
        assert first == "lesion"  # ascending sort by label
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 20_000


def test_review_report_of_a_prediction_folder_renders_review_first(tiny_dataset: Path, smoke_model: Path, tmp_path: Path):
    """`medseg report PRED_DIR` (no reference): the MR-like case is listed first as review, with its reason,
    and every preview (with its uncertainty row) decodes in the browser."""
    _need_browser()
    import numpy as np
    from playwright import sync_api
    from typer.testing import CliRunner

    from medseg.cli import app
    from medseg.io.nifti import write_nifti
    from medseg.io.readers import read_volume

    inputs = tmp_path / "in"
    inputs.mkdir()
    for image in sorted((tiny_dataset / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(image, inputs / image.name)
    ct = read_volume(sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0])
    data = ct.array.astype(np.float32)
    write_nifti(ct.with_array(np.where(data > -500, 900 - 2.0 * (data - 40), 20.0).astype(np.float32)), inputs / "mr_like.nii.gz")
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "-i", str(inputs), "-o", str(tmp_path / "pred"), "-m", str(smoke_model),
                                 "--preview", "--save-uncertainty", "--stats", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "flagged for review" in result.output and "mr_like" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "pred")])
    assert result.exit_code == 0, result.output
    html = tmp_path / "pred" / "review.html"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(html.as_uri())
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        assert len(images) == 3 and all(done and w > 0 and h > 400 for done, w, h in images)
        rows = page.locator("#cases tbody tr")
        assert rows.count() == 3
        first = rows.first.locator("td")
        assert first.nth(0).inner_text() == "mr_like" and first.nth(1).inner_text() == "review"
        assert "unlike the training scans" in rows.first.inner_text()
        assert "research use only" in page.locator(".banner").inner_text().lower()
        if niivue_script() is not None:  # the review case's viewer, from the file predict --preview wrote
            n_review = page.locator("#cases td.verdict-review").count()
            assert page.locator(".viewer").count() == n_review >= 1
            viewer = page.locator(".viewer").first  # mr_like's
            assert viewer.locator(".v-uncertainty").count() == 1
            viewer.locator(".viewer-open").click()
            page.wait_for_function("el => el.dataset.state !== 'loading'", arg=viewer.element_handle(), timeout=60_000)
            assert viewer.get_attribute("data-state") == "ready"
            assert page.evaluate("el => el.nv.volumes.map(v => v.name)", viewer.element_handle()) == [
                "image.nii.gz", "prediction.nii.gz", "uncertainty.nii.gz"]
        browser.close()
    if niivue_script() is not None:
        result = runner.invoke(app, ["report", str(tmp_path / "pred"), "--all-viewers"])
        assert result.exit_code == 0, result.output
        assert html.read_text().count('class="viewer"') == 3
