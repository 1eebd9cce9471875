"""One case identity everywhere: known image endings and nnU-Net's _0000 go, every other dot stays; duplicates
are refused naming both files; dotted names survive train -> predict -> evaluate with the right pairs."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import DatasetError
from medseg.inference.discovery import discover
from medseg.io.dataset import load_dataset
from medseg.io.readers import case_id, files_by_id


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ct_001.nii.gz", "ct_001"),
        ("ct.001.nii.gz", "ct.001"),
        ("ct.002.NII.GZ", "ct.002"),
        ("sub-01_ses.1.nii", "sub-01_ses.1"),
        ("case_0000.nii.gz", "case"),  # nnU-Net's single-channel suffix
        ("case_0001.nii.gz", "case_0001"),  # other channels are not a single-file case
        ("scan.v2.nrrd", "scan.v2"),
        ("scan.mhd", "scan"),
        ("lesion.12.png", "lesion.12"),
        ("photo.JPEG", "photo"),
        ("slice.001.dcm", "slice.001"),
        ("series.1.2.840", "series.1.2.840"),  # a DICOM folder named by UID: no ending to drop
        ("_0000.nii.gz", "_0000"),
    ],
)
def test_case_id_rule(name: str, expected: str):
    assert case_id(Path(name)) == expected


def test_duplicate_ids_in_a_folder_name_both_files(tmp_path: Path, make_volume):
    from medseg.io.nifti import write_nifti

    write_nifti(make_volume(), tmp_path / "a.nii.gz")
    write_nifti(make_volume(), tmp_path / "a_0000.nii.gz")
    for call in (files_by_id, discover):
        with pytest.raises(DatasetError) as err:
            call(tmp_path)
        assert err.value.code == "DATASET_DUPLICATE_ID"
        assert "a.nii.gz" in err.value.message and "a_0000.nii.gz" in err.value.message


def _dotted_dataset(source: Path, root: Path) -> Path:
    """The tiny dataset with dotted case names (``ct.000`` ...): the old dataset rule cut them all to ``ct``."""
    meta = json.loads((source / "dataset.json").read_text())
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True)
        for path in sorted((source / sub).glob("*.nii.gz")):
            shutil.copy(path, root / sub / path.name.replace("ct_", "ct."))
    meta["training"] = [{k: v.replace("ct_", "ct.") for k, v in e.items()} for e in meta["training"]]
    meta["test"] = [e.replace("ct_", "ct.") if isinstance(e, str) else {k: v.replace("ct_", "ct.") for k, v in e.items()}
                    for e in meta["test"]]
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_duplicate_ids_in_a_dataset(tiny_dataset: Path, tmp_path: Path):
    root = _dotted_dataset(tiny_dataset, tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    shutil.copy(root / "imagesTr" / "ct.000.nii.gz", root / "imagesTr" / "ct.000_0000.nii.gz")
    shutil.copy(root / "labelsTr" / "ct.000.nii.gz", root / "labelsTr" / "ct.000_0000.nii.gz")
    meta["training"].append({"image": "./imagesTr/ct.000_0000.nii.gz", "label": "./labelsTr/ct.000_0000.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError) as err:
        load_dataset(root)
    assert err.value.code == "DATASET_DUPLICATE_ID" and "ct.000_0000.nii.gz" in err.value.message
    listed = load_dataset(root, strict=False).problems  # medseg validate lists it instead
    assert ("ct.000", "DATASET_DUPLICATE_ID") in {(p[0], p[1]) for p in listed}


def _medseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg", "-q", *args], capture_output=True, text=True, timeout=600)


def test_dotted_names_survive_train_predict_evaluate(tiny_dataset: Path, tmp_path: Path):
    root = _dotted_dataset(tiny_dataset, tmp_path / "ds")
    ids = [c.id for c in load_dataset(root).training]
    assert ids == ["ct.000", "ct.001", "ct.002"]
    run = tmp_path / "run"
    done = _medseg("train", "-c", "smoke", "--set", f"data.dataset={root}", "--set", "data.val_fraction=0.34",
                   "-o", str(run))
    assert done.returncode == 0, done.stderr
    split = json.loads((run / "splits.json").read_text())
    assert sorted(split["train"] + split["val"]) == ids and not set(split["train"]) & set(split["val"])

    # two test cases whose names differ only after a dot, each evaluated against its own label
    shutil.copy(root / "imagesTr" / "ct.001.nii.gz", root / "imagesTs" / "ct.001.nii.gz")
    shutil.copy(root / "labelsTr" / "ct.001.nii.gz", root / "labelsTs" / "ct.001.nii.gz")
    pred = tmp_path / "pred"
    done = _medseg("predict", "-i", str(root / "imagesTs"), "-o", str(pred), "-m", str(run / "model"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == ["ct.001.nii.gz", "ct.003.nii.gz"]
    done = _medseg("evaluate", "--pred", str(pred), "--ref", str(root / "labelsTs"), "-o", str(tmp_path / "eval"),
                   "--dataset", str(root))
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "eval" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["label"] == "organ"]
    assert sorted(r["case"] for r in rows) == ["ct.001", "ct.003"]
    for row in rows:  # the reference volume is that of the case's own label file
        img = nib.load(root / "labelsTs" / f"{row['case']}.nii.gz")
        ml = float((np.asarray(img.dataobj) == 1).sum() * np.prod(img.header.get_zooms()[:3]) / 1000)
        assert float(row["vol_ref_ml"]) == pytest.approx(ml, rel=1e-4)
