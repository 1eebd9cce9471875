"""Opens report.html in headless Chromium (Debian's, via Playwright): every image decodes, one table row per
case and label, sorting works, and a screenshot is saved. `.ci/run` installs chromium so this runs in CI."""

import os
import shutil
from pathlib import Path

import pytest

from medseg.metrics.evaluate import evaluate_folders
from medseg.reporting.report import write_report

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(tiny_dataset: Path, smoke_model: Path, tmp_path: Path):
    if CHROMIUM is None:
        if os.environ.get("MEDSEG_REQUIRE_BROWSER"):
            pytest.fail("MEDSEG_REQUIRE_BROWSER is set but chromium is not installed")
        pytest.skip("needs Debian's chromium (apt-get install chromium); .ci/run installs it")
    from playwright import sync_api
    from medseg.inference.predictor import Predictor
    from medseg.inference.runner import predict_folder

    predict_folder(Predictor.from_model_dir(smoke_model, "cpu"), tiny_dataset / "imagesTs", tmp_path / "pred")
    evaluate_folders(tmp_path / "pred", tiny_dataset / "labelsTs", tmp_path / "ev", labels={1: "organ", 2: "lesion"},
                     images_dir=tiny_dataset / "imagesTs")
    html = write_report(tmp_path / "ev")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(html.as_uri())
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        assert len(images) == 4 and all(done and width > 0 for done, width in images)
        assert page.locator("#cases tbody tr").count() == 2  # 1 case x 2 labels
        page.locator("#cases th", has_text="label").click()
        first = page.locator("#cases tbody tr").first.locator("td").nth(1).inner_text()
        assert first == "lesion"  # ascending sort by label
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 20_000
