"""End to end on a DICOM-study dataset: image series labelled by RTSTRUCT (medseg's own writer, ROI names in other
cases and spellings, two studies for one patient, an unlabelled series beside a labelled one) -> ``medseg validate``
-> ``medseg train`` (smoke preset) -> ``medseg predict`` over the same folder -> ``medseg evaluate --ref`` the
same folder's structure sets -> report naming the ROIs; and ``medseg convert``. Patient names, IDs and birth dates
planted in the headers and in the folder names reach no output, log, cache or MLflow value."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import CANARY_ID, CANARY_NAME, series
from leak_scan import leaks
from typer.testing import CliRunner

from medseg.cli import app
from medseg.errors import MedsegError
from medseg.io.dicom import read_dicom
from medseg.io.rtstruct import write_rtstruct

CANARIES = [CANARY_ID, CANARY_NAME, "Zebediah", "19230417"]
LABELS = json.dumps({"liver": ["^liver", "leber"], "lesion": {"patterns": ["^gtv", "tumou?r"], "required": False}})
ROI_NAMES = [("Liver", "GTV-1"), ("LIVER", "gtv primary"), ("liver_1", None), ("Leber", "Tumour")]


def _study(folder: Path, k: int, seed: int) -> None:
    affine = np.diag([3.0, 3.0, 6.0, 1.0])
    affine[:3, 3] = (-40 + k, 30, -60 + 3 * k)
    volume, _ = series(folder / "CT", shape=(24, 24, 10), affine=affine, seed=seed, study_uid=pydicom.uid.generate_uid())
    study_uid = pydicom.dcmread(sorted((folder / "CT").glob("*.dcm"))[0]).StudyInstanceUID
    source = read_dicom(folder / "CT")
    labels = np.zeros((1, 24, 24, 10), np.uint8)
    labels[0, 5 + k:17, 6:18, 2:8] = 1
    labels[0, 9:12, 9:12, 4:6] = 2
    liver, lesion = ROI_NAMES[k]
    names = {0: "background", 1: liver} | ({2: lesion} if lesion else {})
    if lesion is None:
        labels[labels == 2] = 1
    write_rtstruct(source.with_array(labels), source, folder / "RS.dcm", names)
    for f in [*folder.rglob("*.dcm")]:
        ds = pydicom.dcmread(f)
        ds.PatientBirthDate = "19230417"
        ds.save_as(f)
    if k == 1:  # an unlabelled series in the same study (e.g. a second reconstruction)
        series(folder / "CT_soft", shape=(24, 24, 10), affine=affine, seed=seed + 7, study_uid=study_uid)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dicom") / "PACS_export"
    patient = root / f"Zebediah_Canary_{CANARY_ID}"
    _study(patient / "study_2024", 0, 1)
    _study(patient / "study_2025", 1, 2)  # the same patient again
    _study(root / "patient_b" / "s1", 2, 3)
    _study(root / "patient_c" / "s1", 3, 4)
    return root


def _run(args: list[str]) -> tuple[int, str]:
    """Exit code and console of one command, a refusal printed as ``medseg.cli.main`` prints it (exit 2)."""
    result = CliRunner().invoke(app, args)
    if isinstance(result.exception, MedsegError):
        return 2, f"{result.output}error: {result.exception.one_line()}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_validate_lists_rois_and_refuses_without_rules(studies: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    code, output = _run(["validate", str(studies)])
    assert code == 2 and "LABEL_RULES_MISSING" in output
    code, output = _run(["validate", str(studies), "--set", f"data.labels={LABELS}", "--json", str(tmp_path / "v.json")])
    assert code == 0, output
    assert "dicom dataset: 4 training" in output and "1 image series without an RTSTRUCT/SEG" in output
    report = json.loads((tmp_path / "v.json").read_text())
    rois = sorted(json.dumps(case["labels"], sort_keys=True) for case in report["sources"]["cases"].values())
    assert rois == sorted(json.dumps(r, sort_keys=True) for r in [
        {"liver": ["Liver"], "lesion": ["GTV-1"]}, {"liver": ["LIVER"], "lesion": ["gtv primary"]},
        {"liver": ["liver_1"]}, {"liver": ["Leber"], "lesion": ["Tumour"]}])
    strict = json.dumps({"liver": ["^liver"], "lesion": ["^gtv"]})
    code, output = _run(["validate", str(studies), "--set", f"data.labels={strict}"])
    assert code == 1 and "LABEL_ROI_MISSING" in output and "'Leber'" in output.replace("\n", "")
    assert not leaks(tmp_path, CANARIES, [output])


def test_train_predict_evaluate_convert_on_dicom_studies(studies: Path, tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    texts = []
    code, output = _run(["train", "-c", "smoke", "-o", str(tmp_path / "run"), "--set", f"data.dataset={studies}",
                         "--set", f"data.labels={LABELS}", "--set", "data.val_fraction=0.25"])
    texts.append(output)
    assert code == 0, output
    model = tmp_path / "run" / "model"
    assert json.loads((model / "model.json").read_text())["labels"] == {"0": "background", "1": "liver", "2": "lesion"}
    code, output = _run(["predict", "-m", str(model), "-i", str(studies), "-o", str(tmp_path / "pred")])
    texts.append(output)
    assert code == 0, output
    predicted = sorted(p.name for p in (tmp_path / "pred").glob("series_*.nii.gz"))
    assert len(predicted) == 5  # the four labelled series and the unlabelled one
    code, output = _run(["evaluate", "-p", str(tmp_path / "pred"), "-r", str(studies), "-o", str(tmp_path / "eval"),
                         "-m", str(model)])
    texts.append(output)
    assert code == 0, output
    with open(tmp_path / "eval" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    cases = {r["case"] for r in rows}
    assert len(cases) == 4 and cases < {p.removesuffix(".nii.gz") for p in predicted}
    context = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["context"]
    assert context["Reference ROIs"] == "liver <- Liver, LIVER, liver_1, Leber; lesion <- GTV-1, gtv primary, Tumour"
    code, output = _run(["report", str(tmp_path / "eval")])
    texts.append(output)
    assert code == 0, output
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "Reference ROIs" in html and "liver &lt;- Liver, LIVER, liver_1, Leber" in html
    code, output = _run(["convert", "-i", str(studies), "-o", str(tmp_path / "converted"), "--set", f"data.labels={LABELS}"])
    texts.append(output)
    assert code == 0, output
    assert len(list((tmp_path / "converted").glob("*_labels.nii.gz"))) == 4
    texts.extend(r.getMessage() for r in caplog.records)
    assert not leaks(tmp_path, CANARIES, texts)
