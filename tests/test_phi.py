"""PHI canary: patient name, ID and birth date planted in DICOM inputs must reach no output file name or
content, log line, error message or tracked (MLflow) value: convert, validate, train (with MLflow) and predict
(manifest, provenance, stats, previews, probabilities) are all run over canary-carrying series.

DICOM-SEG outputs are the one deliberate exception: a derived DICOM object repeats its source's patient module
so that a PACS files it with the right patient (tested in tests/io/test_dicom.py, not here)."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from dicom_helpers import CANARY_ID, CANARY_NAME, series
from typer.testing import CliRunner

from medseg.cli import app

CANARY_BIRTH_DATE = "19230417"
CANARIES = [CANARY_ID, CANARY_NAME, CANARY_NAME.replace("^", " "), "Zebediah", CANARY_BIRTH_DATE]


def _plant_birth_date(folder: Path) -> None:
    for f in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.PatientBirthDate = CANARY_BIRTH_DATE
        ds.save_as(f)


def _leaks(root: Path, texts: list[str]) -> list[str]:
    found = []
    for path in [p for p in root.rglob("*")]:
        for canary in CANARIES:
            if canary.lower() in str(path.relative_to(root)).lower():
                found.append(f"file name {path}")
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        for canary in CANARIES:
            if canary.encode() in data:
                found.append(f"content of {path.relative_to(root)}: {canary}")
    for i, text in enumerate(texts):
        for canary in CANARIES:
            if canary.lower() in text.lower():
                found.append(f"log/output #{i}: {canary}")
    return found


def test_no_canary_in_outputs_logs_errors_or_tracking(tmp_path: Path, caplog):
    caplog.set_level(logging.DEBUG)
    inputs = tmp_path / "inputs"
    outputs = tmp_path / "outputs"
    runner = CliRunner()
    texts: list[str] = []
    # a paired dataset whose images are DICOM series carrying the canaries
    rng = np.random.default_rng(0)
    for i in range(4):
        volume, _ = series(inputs / "images" / f"case{i}", shape=(24, 24, 12), affine=np.diag([1.5, 1.5, 3.0, 1.0]), seed=i)
        label = np.zeros(volume.spatial_shape, np.uint8)
        label[6 + i : 16, 6:18, 3:9] = 1
        (inputs / "labels").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(label, volume.affine), inputs / "labels" / f"case{i}.nii.gz")
    broken, files = series(inputs / "broken", shape=(8, 8, 6), seed=9)
    files[3].unlink()  # a slice gap: the error message must not name the patient
    _plant_birth_date(inputs)
    assert pydicom.dcmread(next((inputs / "images" / "case0").glob("*.dcm"))).PatientID == CANARY_ID

    for args in (
        ["convert", "-i", str(inputs / "images"), "-o", str(outputs / "converted")],
        ["convert", "-i", str(inputs / "broken"), "-o", str(outputs / "broken.nii.gz")],
        ["validate", str(inputs), "--json", str(outputs / "validate.json")],
        ["train", "-c", "smoke", "-o", str(outputs / "run"), "--set", f"data.dataset={inputs}"],
    ):
        result = runner.invoke(app, args)
        texts.append(result.output)
        if result.exception and not isinstance(result.exception, SystemExit):
            texts.append(repr(result.exception))
    result = runner.invoke(app, ["predict", "-i", str(inputs), "-o", str(outputs / "pred"), "-m", str(outputs / "run" / "model"),
                                 "-d", "cpu", "--stats", "--preview", "--save-probabilities"])
    texts.append(result.output)
    assert "4 of 5 case(s) written" in result.output, result.output  # the 4 series; the gapped one fails
    assert (outputs / "pred" / "provenance.json").is_file() and len(list((outputs / "pred" / "previews").glob("*.png"))) == 4
    assert "DICOM_SLICE_GAP" in texts[1]
    assert (outputs / "run" / "mlflow.db").is_file(), texts[3]
    assert len(list((outputs / "converted").glob("*.nii.gz"))) == 4
    texts.extend(record.getMessage() for record in caplog.records)
    assert _leaks(outputs, texts) == []


def test_the_leak_detector_finds_planted_values(tmp_path: Path):
    (tmp_path / "a.txt").write_text(f"name={CANARY_NAME}")
    with gzip.open(tmp_path / "b.nii.gz", "wb") as fh:
        fh.write(CANARY_ID.encode())
    (tmp_path / f"{CANARY_BIRTH_DATE}.json").write_text("{}")
    leaks = _leaks(tmp_path, ["log line about Zebediah"])
    assert {leak.split(":")[0] for leak in leaks if "content" in leak} == {"content of a.txt", "content of b.nii.gz"}
    assert any("file name" in leak for leak in leaks) and any("log/output" in leak for leak in leaks)
