"""PHI canary: patient name, ID and birth date planted in DICOM tags, in the name of the folder a PACS export
sits in, in DICOM folder names inside the input and in DICOM file names must reach no output file name or
content, log line, error message or tracked (MLflow) value. convert, validate, train (with MLflow, its validation
evaluation, HTML and PDF report), predict (manifest, provenance, stats, previews, probabilities) and evaluate
all run over canary-carrying inputs, given by absolute paths as users type them, and every file they write is
read the way its format stores text: gzip and zip members (.nii.gz, .npz, .pt) decompressed, PDF streams
inflated, PNG text chunks decoded, the SQLite MLflow store read raw.

Two deliberate exceptions, both tested elsewhere: DICOM-SEG and RTSTRUCT outputs repeat their source's patient module
so that a PACS files them with the right patient (tests/io/test_dicom.py, tests/io/test_rtstruct.py; the PACS
tests check manifests and consoles for the canary); the run folder's own ``config.yaml`` keeps
``data.dataset`` as the user gave it, so that ``--resume`` finds the data (here: asserted to be the only place,
and absent from the model folder, MLflow params and artifacts)."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import yaml
from dicom_helpers import CANARY_ID, CANARY_NAME, series
from leak_scan import decoded
from typer.testing import CliRunner

from medseg.cli import app

CANARY_BIRTH_DATE = "19230417"
CANARIES = [CANARY_ID, CANARY_NAME, CANARY_NAME.replace("^", " "), "Zebediah", CANARY_BIRTH_DATE]
PACS_FOLDER = f"Zebediah_Canary_{CANARY_ID}"  # export folders are often named after the patient


def _plant(folder: Path) -> None:
    """Birth date into every file; DICOM file names after the patient."""
    for k, f in enumerate(sorted(folder.rglob("*.dcm"))):
        ds = pydicom.dcmread(f)
        ds.PatientBirthDate = CANARY_BIRTH_DATE
        ds.save_as(f.with_name(f"Zebediah_{CANARY_ID}_{k:04d}.dcm"))
        f.unlink()


def _leaks(root: Path, texts: list[str], skip: tuple[Path, ...] = ()) -> list[str]:
    found = []
    for path in root.rglob("*"):
        for canary in CANARIES:
            if canary.lower() in str(path.relative_to(root)).lower():
                found.append(f"file name {path.relative_to(root)}")
        if not path.is_file() or path in skip:
            continue
        data = decoded(path).lower()
        for canary in CANARIES:
            if canary.lower().encode() in data or canary.lower().encode("utf-16-le") in data:
                found.append(f"content of {path.relative_to(root)}: {canary}")
    for i, text in enumerate(texts):
        for canary in CANARIES:
            if canary.lower() in text.lower():
                found.append(f"log/output #{i}: {canary}")
    return found


def test_no_canary_in_outputs_logs_errors_or_tracking(tmp_path: Path, caplog):
    caplog.set_level(logging.DEBUG)
    inputs = tmp_path / PACS_FOLDER / "export"
    outputs = tmp_path / "outputs"
    runner = CliRunner()
    texts: list[str] = []
    # a paired dataset whose images are DICOM series carrying the canaries
    for i in range(4):
        volume, _ = series(inputs / "dataset" / "images" / f"case{i}", shape=(24, 24, 12),
                           affine=np.diag([1.5, 1.5, 3.0, 1.0]), seed=i)
        label = np.zeros(volume.spatial_shape, np.uint8)
        label[6 + i : 16, 6:18, 3:9] = 1
        (inputs / "dataset" / "labels").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(label, volume.affine), inputs / "dataset" / "labels" / f"case{i}.nii.gz")
    # what predict reads: series in folders named after the patient, one with a slice gap, one unreadable file
    pacs = inputs / "pacs"
    series(pacs / CANARY_ID / "Zebediah_CT", shape=(24, 24, 12), affine=np.diag([1.5, 1.5, 3.0, 1.0]), seed=5)
    _, files = series(pacs / CANARY_ID / "Zebediah_gap", shape=(8, 8, 6), seed=9)
    files[3].unlink()
    _plant(inputs)
    (pacs / CANARY_ID / f"Zebediah_{CANARY_ID}_broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    assert pydicom.dcmread(next((inputs / "dataset" / "images" / "case0").glob("*.dcm"))).PatientID == CANARY_ID

    dataset = inputs / "dataset"
    for args in (
        ["convert", "-i", str(pacs), "-o", str(outputs / "converted")],
        ["validate", str(dataset), "--json", str(outputs / "validate.json")],
        ["train", "-c", "smoke", "-o", str(outputs / "run"), "--set", f"data.dataset={dataset}"],
        ["predict", "-i", str(pacs), "-o", str(outputs / "pred"), "-m", str(outputs / "run" / "model"),
         "-d", "cpu", "--stats", "--preview", "--save-probabilities"],
        *[["convert", "-i", str(dataset / "images" / f"case{i}"), "-o", str(outputs / "nifti" / f"case{i}.nii.gz")]
          for i in range(4)],
        ["predict", "-i", str(outputs / "nifti"), "-o", str(outputs / "pred_ds"), "-m", str(outputs / "run" / "model"),
         "-d", "cpu"],
        ["evaluate", "-p", str(outputs / "pred_ds"), "-r", str(dataset / "labels"), "-o", str(outputs / "eval"),
         "--images", str(outputs / "nifti"), "-m", str(outputs / "run" / "model")],
        ["report", str(outputs / "eval")],
    ):
        result = runner.invoke(app, args)
        texts.append(result.output)
        if result.exception and not isinstance(result.exception, SystemExit):
            texts.append(repr(result.exception))
    assert "DICOM_SLICE_GAP" in texts[0] and ("DICOM_UNREADABLE" in texts[0] or "DICOM_NO_TRANSFER_SYNTAX" in texts[0]), texts[0]
    assert (outputs / "run" / "mlflow.db").is_file(), texts[2]
    assert "1 of 3 case(s) written" in texts[3], texts[3]  # the good series; the gapped and broken ones fail
    assert (outputs / "pred" / "provenance.json").is_file() and len(list((outputs / "pred" / "previews").glob("*.png"))) == 1
    assert "4 of 4 case(s) written" in texts[8], texts[4:9]
    assert (outputs / "eval" / "report.html").is_file() and (outputs / "eval" / "report.pdf").is_file(), texts[9:]
    assert len(list(outputs.rglob("*.pdf"))) >= 2 and list(outputs.rglob("*.npz")) and list(outputs.rglob("*.pt"))
    texts.extend(record.getMessage() for record in caplog.records)

    # the run folder's config.yaml names the dataset (for --resume), and nothing else does
    run_config = outputs / "run" / "config.yaml"
    assert yaml.safe_load(run_config.read_text())["data"]["dataset"] == str(dataset)
    assert _leaks(outputs, texts, skip=(run_config,)) == []
    assert yaml.safe_load((outputs / "run" / "model" / "config.yaml").read_text())["data"]["dataset"] is None

    # no absolute path of an input anywhere in the outputs (manifests record inputs relative to their folder)
    for path in outputs.rglob("*"):
        if path.is_file() and path != run_config:
            assert str(tmp_path / PACS_FOLDER).encode() not in decoded(path), path


def test_the_leak_detector_finds_planted_values(tmp_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages
    from PIL import Image, PngImagePlugin

    (tmp_path / "a.txt").write_text(f"name={CANARY_NAME}")
    with gzip.open(tmp_path / "b.nii.gz", "wb") as fh:
        fh.write(CANARY_ID.encode())
    (tmp_path / f"{CANARY_BIRTH_DATE}.json").write_text("{}")
    np.savez_compressed(tmp_path / "c.npz", **{"x": np.frombuffer(CANARY_ID.encode(), np.uint8)})
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", f"patient {CANARY_NAME}", zip=True)
    Image.new("L", (4, 4)).save(tmp_path / "d.png", pnginfo=info)
    with PdfPages(tmp_path / "e.pdf") as pdf:
        fig = plt.figure()
        fig.text(0.5, 0.5, f"case of {CANARY_ID}")
        pdf.savefig(fig)
        plt.close(fig)
    assert CANARY_ID.encode() not in (tmp_path / "e.pdf").read_bytes()  # compressed: a raw scan would miss it
    leaks = _leaks(tmp_path, ["log line about Zebediah"])
    contents = {leak.split(":")[0] for leak in leaks if leak.startswith("content")}
    assert contents == {f"content of {n}" for n in ("a.txt", "b.nii.gz", "c.npz", "d.png", "e.pdf")}, leaks
    assert any("file name" in leak for leak in leaks) and any("log/output" in leak for leak in leaks)
