import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.errors import InputError
from medseg.metrics.evaluate import evaluate_folders
from medseg.reporting.report import build_report, flag_rows, pick_overlay_cases, write_overlays, write_report

SETTINGS = {"flag_dice_below": 0.5, "flag_worst_fraction": 0.05, "flag_volume_error_pct": 20}


def _row(case: str, dice: float, ref: float = 10.0, pred: float = 10.0, border: bool = False) -> dict:
    err = 100 * (pred - ref) / ref if ref else math.nan
    return {"case": case, "label": "organ", "dice": dice, "vol_ref_ml": ref, "vol_pred_ml": pred, "vol_err_pct": err,
            "touches_border": border}


def test_flags_follow_the_settings():
    rows = [
        _row("ok", 0.9), _row("low", 0.3), _row("missed", 0.0, pred=0.0), _row("extra", 0.0, ref=0.0, pred=2.0),
        _row("big", 0.8, pred=13.0), _row("edge", 0.85, border=True), _row("fine", 0.95),
    ]
    flag_rows(rows, SETTINGS)
    flags = {r["case"]: r["flags"] for r in rows}
    assert flags["ok"] == [] and flags["fine"] == []
    assert flags["low"] == ["Dice < 0.5"]
    assert "missed: empty prediction" in flags["missed"] and "worst 5%" in flags["missed"]
    assert "false structure: empty reference" in flags["extra"]
    assert flags["big"] == ["volume error > 20%"]
    assert flags["edge"] == ["touches image border"]


def test_overlay_selection_best_median_worst_then_flagged():
    rows = [_row("a", 0.9), _row("b", 0.8), _row("c", 0.7), _row("d", 0.3), _row("e", 0.95)]
    flag_rows(rows, SETTINGS)
    assert pick_overlay_cases(rows) == [("e", "best"), ("b", "median"), ("d", "worst")]
    rows.append(_row("f", 0.75, border=True))
    flag_rows(rows, SETTINGS)
    assert ("f", "flagged") in pick_overlay_cases(rows)


@pytest.fixture(scope="module")
def evaluated(tiny_dataset: Path, smoke_model: Path, tmp_path_factory) -> Path:
    from medseg.inference.predictor import Predictor
    from medseg.inference.runner import predict_folder

    out = tmp_path_factory.mktemp("rep")
    predict_folder(Predictor.from_model_dir(smoke_model, "cpu"), tiny_dataset / "imagesTs", out / "pred")
    meta = out / "meta.csv"
    meta.write_text("case,site\nct_003,hospital-A\n")
    evaluate_folders(
        out / "pred", tiny_dataset / "labelsTs", out / "ev", labels={1: "organ", 2: "lesion"},
        metadata=meta, context={"Model": "smoke"}, window=(-160, 240),
    )
    write_overlays(out / "ev", out / "pred", tiny_dataset / "labelsTs", tiny_dataset / "imagesTs")
    return out / "ev"


def test_report_content(evaluated: Path):
    html = write_report(evaluated).read_text()
    assert "Research use only — not a medical device" in html and "smoke" in html
    assert html.count('class="case-row"') == 2
    assert "window [-160, 240]" in html
    assert re.search(r"hospital-A</td><td>1 <span class=\"small\">small N", html)
    assert "slice thickness" in html  # automatic subgroup from the geometry
    assert "percentile bootstrap" in html and "MedPy" in html  # methods appendix
    assert not re.search(r'(src|href)="(https?:)?//', html)
    pdf = (evaluated / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and len(pdf) > 10_000


def test_report_data_overlays_are_three_plane_pngs(evaluated: Path):
    data = build_report(evaluated)
    assert [o["case"] for o in data["overlays"]] == ["ct_003"]
    png = data["overlays"][0]["png"]
    assert png.startswith(b"\x89PNG")
    from io import BytesIO

    width, height = Image.open(BytesIO(png)).size
    assert width > 2.5 * height  # axial, coronal and sagittal side by side


def test_2d_report_has_2d_overlays(tmp_path: Path):
    from medseg.sample_data import write_sample_data

    root = write_sample_data(tmp_path / "d", cases=4, seed=0, kinds=("derm2d",))["derm2d"]
    pred = tmp_path / "pred"
    shutil.copytree(root / "labelsTs", pred)
    mask = np.asarray(Image.open(pred / "derm_003.png")).copy()
    Image.fromarray(np.roll(mask, 4, axis=0)).save(pred / "derm_003.png")
    evaluate_folders(pred, root / "labelsTs", tmp_path / "ev", labels={1: "lesion"})
    write_overlays(tmp_path / "ev", pred, root / "labelsTs", root / "imagesTs")
    data = build_report(tmp_path / "ev")
    width, height = Image.open(__import__("io").BytesIO(data["overlays"][0]["png"])).size
    assert width == height  # one panel
    html = write_report(tmp_path / "ev").read_text()
    assert "cm²" in html


def test_report_of_missing_folder(tmp_path: Path):
    from medseg.errors import InputError

    with pytest.raises(InputError) as info:
        write_report(tmp_path / "nope")
    assert info.value.code == "PATH_NOT_FOUND"


def test_report_knobs_come_from_the_evaluation_settings():
    from medseg.config import load_config
    from medseg.reporting.report import _slice_thickness_group

    settings = load_config(None).evaluation
    assert settings.report_max_flagged_overlays == 40 and settings.report_slice_thickness_bins_mm == [2.5, 5.0]
    assert [_slice_thickness_group([1, 1, z]) for z in (1.0, 3.0, 7.0)] == ["< 2.5 mm", "2.5–5 mm", "> 5 mm"]
    edges = load_config(None, ["evaluation.report_slice_thickness_bins_mm=[1.5, 3, 6]"]).evaluation.report_slice_thickness_bins_mm
    assert [_slice_thickness_group([1, 1, z], edges) for z in (1.0, 2.0, 5.0, 8.0)] == [
        "< 1.5 mm", "1.5–3 mm", "3–6 mm", "> 6 mm"]


def test_flagged_overlay_cap_is_a_setting(evaluated: Path, tiny_dataset: Path, tmp_path: Path):
    from medseg.config import load_config
    from medseg.io.readers import files_by_id

    folders = {}
    for name, source in (("pred", evaluated.parent / "pred"), ("ref", tiny_dataset / "labelsTs"), ("img", tiny_dataset / "imagesTs")):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for copy in "abcdef":  # six copies of the test case: three are neither best, median nor worst
            for case, path in files_by_id(source).items():
                shutil.copy(path, folders[name] / path.name.replace(case, f"{copy}{case}"))
    drawn = {}
    for cap in (40, 0):  # flag_dice_below 1.0: every case is flagged
        settings = load_config(None, [f"evaluation.report_max_flagged_overlays={cap}", "evaluation.flag_dice_below=1.0"])
        out = tmp_path / f"ev{cap}"
        evaluate_folders(folders["pred"], folders["ref"], out, settings=settings.evaluation,
                         labels={1: "organ", 2: "lesion"})
        write_overlays(out, folders["pred"], folders["ref"], folders["img"])
        data = build_report(out)
        drawn[cap] = (sum(o["why"] == "flagged" for o in data["overlays"]), data["flagged_not_shown"])
    assert drawn[40][0] >= 1 and drawn[40][1] == 0
    assert drawn[0] == (0, drawn[40][0])


def test_the_evaluation_folder_alone_renders_its_report(evaluated: Path, tmp_path: Path):
    """No input path is recorded (PHI); the figures are drawn at evaluation time, so a moved copy renders."""
    import json

    copy = tmp_path / "elsewhere" / "ev"
    shutil.copytree(evaluated, copy)
    text = (copy / "evaluation.json").read_text()
    assert str(evaluated.parent) not in text and "imagesTs" not in text and "labelsTs" not in text
    assert not any(isinstance(v, str) and v.startswith("/") for v in json.loads(text).values())
    data = build_report(copy)
    assert len(data["overlays"]) == 1 and all(o["png"].startswith(b"\x89PNG") for o in data["overlays"])
    shutil.rmtree(copy / "overlays")
    with pytest.raises(InputError, match="EVAL_DIR_INVALID|overlays"):
        build_report(copy)

def test_a_label_whose_distances_are_undefined_in_every_case_still_reports(tiny_dataset: Path, tmp_path: Path):
    """The lesion is missed in every case (HD95 undefined, its summary statistics null): the report says so
    instead of failing (a 1-case validation split hit this as INTERNAL_ERROR: KeyError 'median')."""
    import nibabel as nib

    pred = tmp_path / "pred"
    pred.mkdir()
    for ref in sorted((tiny_dataset / "labelsTs").glob("*.nii.gz")):
        img = nib.load(ref)
        data = np.asarray(img.dataobj).copy()
        data[data == 2] = 0  # no lesion predicted
        nib.save(nib.Nifti1Image(data, img.affine, img.header), pred / ref.name)
    evaluate_folders(pred, tiny_dataset / "labelsTs", tmp_path / "ev", labels={1: "organ", 2: "lesion"})
    write_overlays(tmp_path / "ev", pred, tiny_dataset / "labelsTs", tiny_dataset / "imagesTs")
    data = build_report(tmp_path / "ev")
    assert data["summary"]["lesion"]["hd95"]["median"] is None
    assert not any("median HD95" in s for s in data["cards"]["lesion"])
    assert any("median HD95" in s for s in data["cards"]["organ"])
    assert "lesion" in write_report(tmp_path / "ev").read_text()


def test_text_from_inputs_is_escaped(evaluated: Path, tmp_path: Path):
    """Names that come from inputs (RTSTRUCT ROI names, models' and datasets' label names) are text, never markup: the
    templates are autoescaped (they end in .html.j2, which jinja2's default selection did not cover)."""
    import json

    copy = tmp_path / "ev"
    shutil.copytree(evaluated, copy)
    record = json.loads((copy / "evaluation.json").read_text())
    record["context"]["Reference ROIs"] = 'lesion <- <script>alert("x")</script>'
    (copy / "evaluation.json").write_text(json.dumps(record))
    html = write_report(copy).read_text()
    assert '<script>alert("x")' not in html and "lesion &lt;- &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
