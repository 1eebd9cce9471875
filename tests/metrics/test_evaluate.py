import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.config import load_config
from medseg.errors import InputError
from medseg.io.nifti import write_nifti
from medseg.io.volume import Volume
from medseg.metrics.evaluate import COLUMNS, evaluate_folders
from medseg.metrics.overlap import dice
from tests.conftest import oblique_affine

AFFINE = oblique_affine((0.8, 0.8, 2.5), 10.0, (1, -1, 1))


def _write(folder: Path, case: str, arr: np.ndarray, affine=AFFINE) -> None:
    write_nifti(Volume(arr[None].astype(np.uint8), affine), folder / f"{case}.nii.gz")


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Three cases: good, missed lesion (empty prediction), and lesion absent from both."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    base = np.zeros((30, 30, 12), np.uint8)
    base[5:20, 5:20, 2:10] = 1
    good_ref, good_pred = base.copy(), base.copy()
    good_ref[8:12, 8:12, 4:7] = 2
    good_pred[9:13, 8:12, 4:7] = 2
    good_pred[6:19, 5:20, 2:10][good_pred[6:19, 5:20, 2:10] == 0] = 1
    missed_ref = base.copy()
    missed_ref[8:12, 8:12, 4:7] = 2
    _write(ref, "a_good", good_ref)
    _write(pred, "a_good", good_pred)
    _write(ref, "b_missed", missed_ref)
    _write(pred, "b_missed", base)
    _write(ref, "c_none", base)
    _write(pred, "c_none", base)
    return pred, ref


def _rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_metrics_csv_columns_and_values(folders, tmp_path: Path):
    pred, ref = folders
    out = tmp_path / "ev"
    evaluate_folders(pred, ref, out, labels={1: "organ", 2: "lesion"})
    rows = _rows(out)
    assert list(rows[0]) == COLUMNS and COLUMNS[:16] == [
        "case", "label", "dice", "iou", "hd95", "hd", "assd", "nsd", "vol_ref_ml", "vol_pred_ml", "vol_err_ml",
        "vol_err_pct", "lesions_ref", "lesions_pred", "lesions_tp", "lesion_f1",
    ]
    by = {(r["case"], r["label"]): r for r in rows}
    good = by[("a_good", "lesion")]
    ref_mask = np.zeros((30, 30, 12), bool)
    ref_mask[8:12, 8:12, 4:7] = True
    pred_mask = np.roll(ref_mask, 1, axis=0)
    assert float(good["dice"]) == pytest.approx(dice(pred_mask, ref_mask), abs=1e-6)
    voxel_ml = abs(np.linalg.det(AFFINE[:3, :3])) / 1000
    assert float(good["vol_ref_ml"]) == pytest.approx(48 * voxel_ml, rel=1e-5)
    assert good["lesions_tp"] == "1" and good["touches_border"] == "False"
    # missed lesion: empty prediction vs non-empty reference
    missed = by[("b_missed", "lesion")]
    assert float(missed["dice"]) == 0 and float(missed["nsd"]) == 0 and math.isnan(float(missed["hd95"]))
    assert (missed["lesions_ref"], missed["lesions_tp"], float(missed["lesion_f1"])) == ("1", "0", 0.0)
    # absent from both: undefined
    none = by[("c_none", "lesion")]
    assert math.isnan(float(none["dice"])) and math.isnan(float(none["lesion_f1"]))


def test_summary_has_cis_and_counts_undefined(folders, tmp_path: Path):
    pred, ref = folders
    summary = evaluate_folders(pred, ref, tmp_path / "ev", labels={1: "organ", 2: "lesion"})
    lesion = summary["lesion"]["dice"]
    assert lesion["n"] == 2 and lesion["n_undefined"] == 1
    assert lesion["ci_low"] <= lesion["mean"] <= lesion["ci_high"]
    assert {"median", "q1", "q3", "iqr"} <= set(lesion)
    pooled = summary["lesion"]["lesions_pooled"]
    assert (pooled["n_ref"], pooled["detected"], pooled["missed"], pooled["false_positive"]) == (2, 1, 1, 0)
    on_disk = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert on_disk["lesion"]["dice"]["n"] == 2


def test_empty_rules_are_configurable(folders, tmp_path: Path):
    pred, ref = folders
    settings = load_config(None, ["evaluation.empty_both=perfect", "evaluation.empty_one_distance=diagonal"]).evaluation
    evaluate_folders(pred, ref, tmp_path / "ev", settings=settings, labels={2: "lesion"}, allowed={1, 2})
    by = {r["case"]: r for r in _rows(tmp_path / "ev")}
    assert float(by["c_none"]["dice"]) == 1.0 and float(by["c_none"]["hd95"]) == 0.0
    diagonal = np.linalg.norm(np.array([30, 30, 12]) * np.array([0.8, 0.8, 2.5]))
    assert float(by["b_missed"]["hd95"]) == pytest.approx(diagonal, rel=1e-5)


def test_parallel_equals_serial(folders, tmp_path: Path):
    pred, ref = folders
    serial = load_config(None, ["evaluation.workers=1"]).evaluation
    parallel = load_config(None, ["evaluation.workers=2"]).evaluation
    evaluate_folders(pred, ref, tmp_path / "s", settings=serial, labels={1: "organ", 2: "lesion"})
    evaluate_folders(pred, ref, tmp_path / "p", settings=parallel, labels={1: "organ", 2: "lesion"})
    assert (tmp_path / "s" / "metrics.csv").read_text() == (tmp_path / "p" / "metrics.csv").read_text()


def test_nsd_tolerance_per_label(folders, tmp_path: Path):
    pred, ref = folders
    settings = load_config(None, ["evaluation.nsd_tolerance_per_label={lesion: 0.5}"]).evaluation
    evaluate_folders(pred, ref, tmp_path / "ev", settings=settings, labels={1: "organ", 2: "lesion"})
    tol = {(r["case"], r["label"]): r["nsd_tol_mm"] for r in _rows(tmp_path / "ev")}
    assert tol[("a_good", "lesion")] == "0.5" and tol[("a_good", "organ")] == "2"


def test_grid_mismatch_names_the_case(folders, tmp_path: Path):
    pred, ref = folders
    _write(pred, "a_good", np.zeros((30, 30, 12)), affine=np.eye(4))
    with pytest.raises(InputError) as info:
        evaluate_folders(pred, ref, tmp_path / "ev")
    assert info.value.code == "GRID_MISMATCH" and "a_good" in info.value.message


def test_missing_predictions_listed(folders, tmp_path: Path):
    pred, ref = folders
    (pred / "b_missed.nii.gz").unlink()
    with pytest.raises(InputError) as info:
        evaluate_folders(pred, ref, tmp_path / "ev")
    assert info.value.code == "EVAL_MISSING_PREDICTIONS" and "b_missed" in info.value.message


def test_metadata_is_recorded_and_validated(folders, tmp_path: Path):
    pred, ref = folders
    meta = tmp_path / "meta.csv"
    meta.write_text("case,scanner\na_good,A\nb_missed,B\nc_none,A\n")
    evaluate_folders(pred, ref, tmp_path / "ev", metadata=meta)
    record = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert record["cases"]["b_missed"]["metadata"] == {"scanner": "B"}
    bad = tmp_path / "bad.csv"
    bad.write_text("id,scanner\nx,A\n")
    with pytest.raises(InputError) as info:
        evaluate_folders(pred, ref, tmp_path / "ev2", metadata=bad)
    assert info.value.code == "METADATA_INVALID"


def test_2d_png_masks(tmp_path: Path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    r = np.zeros((40, 50), np.uint8)
    r[10:30, 10:30] = 1
    p = np.roll(r, 3, axis=1)
    Image.fromarray(r).save(ref / "d1.png")
    Image.fromarray(p).save(pred / "d1.png")
    summary = evaluate_folders(pred, ref, tmp_path / "ev", labels={1: "lesion"})
    assert summary["lesion"]["dice"]["mean"] == pytest.approx(dice(p == 1, r == 1))
    assert summary["lesion"]["hd"]["mean"] == pytest.approx(3.0)
    record = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert record["units"]["volume"] == "cm²" and record["cases"]["d1"]["dims"] == 2
    row = _rows(tmp_path / "ev")[0]
    assert float(row["vol_ref_ml"]) == pytest.approx(400 / 100)  # 400 px of 1 mm² = 4 cm²


def test_a_catalogue_entry_reaches_csv_summary_report_and_tracking(folders, tmp_path: Path):
    """The relative volume difference is one module and one registration (medseg.metrics.relative_volume): it is a
    metrics.csv column, summarised in summary.json, a row of the report's per-label table and an MLflow metric,
    and its values are (V_pred - V_ref) / V_ref counted here independently from the label maps."""
    import nibabel as nib

    from medseg.metrics.catalogue import names
    from medseg.reporting.report import build_report, write_overlays
    from medseg.workflow import summary_metrics

    pred, ref = folders
    out = tmp_path / "ev"
    summary = evaluate_folders(pred, ref, out, labels={1: "organ", 2: "lesion"})
    write_overlays(out, pred, ref)
    rows = {(r["case"], r["label"]): r for r in _rows(out)}
    assert COLUMNS[-1] == "rvd" and "rvd" in names("summary")
    for (case, label), row in rows.items():
        value = {"organ": 1, "lesion": 2}[label]
        p = int((np.asarray(nib.load(pred / f"{case}.nii.gz").dataobj) == value).sum())
        r = int((np.asarray(nib.load(ref / f"{case}.nii.gz").dataobj) == value).sum())
        expected = (p - r) / r if r else math.nan
        assert (math.isnan(expected) and row["rvd"] == "nan") or float(row["rvd"]) == pytest.approx(expected, rel=1e-5)
    assert summary["organ"]["rvd"]["n"] == 3 and summary["lesion"]["rvd"]["n"] == 2  # undefined without a reference
    assert ("rvd", "RVD") in build_report(out)["card_metrics"]
    assert "eval_rvd_organ" in summary_metrics(summary, "eval")
