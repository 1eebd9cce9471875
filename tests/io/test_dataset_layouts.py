"""nnU-Net v2 raw, paired folders and CSV manifests discover the same cases as MSD; `medseg validate`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from dicom_helpers import series
from typer.testing import CliRunner

from medseg.cli import app
from medseg.io.dataset import load_dataset
from medseg.io.readers import read_channels
from medseg.io.validate import validate_dataset


def _nifti(path: Path, data: np.ndarray, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)


def _nnunet(root: Path, n: int = 3, channels: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        for c in range(channels):
            _nifti(root / "imagesTr" / f"case{i}_{c:04d}.nii.gz", rng.normal(size=(6, 6, 4)).astype(np.float32))
        _nifti(root / "labelsTr" / f"case{i}.nii.gz", rng.integers(0, 3, (6, 6, 4)).astype(np.uint8))
    meta = {"channel_names": {str(c): f"MR{c}" for c in range(channels)}, "labels": {"background": 0, "a": 1, "b": 2},
            "numTraining": n, "file_ending": ".nii.gz", "name": "Dataset001_Test"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_nnunet_raw_layout_with_channels(tmp_path: Path):
    root = _nnunet(tmp_path / "nn")
    ds = load_dataset(root)
    assert ds.layout == "nnunet" and ds.labels == {0: "background", 1: "a", 2: "b"}
    assert [c.id for c in ds.training] == ["case0", "case1", "case2"]
    assert [p.name for p in ds.training[0].images] == ["case0_0000.nii.gz", "case0_0001.nii.gz"]
    image = read_channels(ds.training[0].images)
    assert image.array.shape == (2, 6, 6, 4)
    assert validate_dataset(root).ok


def test_nnunet_problems_are_reported_per_case(tmp_path: Path):
    root = _nnunet(tmp_path / "nn")
    (root / "imagesTr" / "case1_0001.nii.gz").unlink()  # missing channel
    _nifti(root / "labelsTr" / "orphan.nii.gz", np.zeros((6, 6, 4), np.uint8))
    _nifti(root / "imagesTr" / "case2_0001.nii.gz", np.zeros((6, 6, 4), np.float32), np.diag([2.0, 1, 1, 1]))
    report = validate_dataset(root)
    found = sorted((p.case_id, p.code) for p in report.problems)
    assert found == [("case1", "DATASET_FILES_MISSING"), ("case2", "CHANNELS_GRID_MISMATCH"),
                     ("orphan", "DATASET_FILES_MISSING")]


def test_paired_folders_with_a_dicom_series_and_inferred_labels(tmp_path: Path):
    root = tmp_path / "paired"
    volume, _ = series(root / "images" / "p1", shape=(8, 8, 4))
    label = np.zeros((8, 8, 4), np.uint8)
    label[2:4, 2:4, 1:3] = 5
    _nifti(root / "labels" / "p1.nii.gz", label, volume.affine)
    _nifti(root / "images" / "p2.nii.gz", np.zeros((5, 5, 5), np.int16))
    _nifti(root / "labels" / "p2.nii.gz", np.zeros((5, 5, 5), np.uint8))
    ds = load_dataset(root)
    assert ds.layout == "paired" and [c.id for c in ds.training] == ["p1", "p2"]
    assert ds.labels == {0: "background", 5: "label_5"}
    assert validate_dataset(root).ok


def test_csv_manifest_with_splits_and_label_sidecar(tmp_path: Path, tiny_dataset: Path):
    root = tmp_path / "csvds"
    shutil.copytree(tiny_dataset, root)
    rows = ["case_id,image,label,split"]
    msd = load_dataset(tiny_dataset)
    for c in msd.training:
        rows.append(f"{c.id},imagesTr/{c.image.name},labelsTr/{c.label.name},train")
    rows.append(f"{msd.test[0].id},imagesTs/{msd.test[0].image.name},,test")
    (root / "cases.csv").write_text("\n".join(rows) + "\n")
    (root / "labels.json").write_text(json.dumps({"0": "background", "1": "organ", "2": "lesion"}))
    ds = load_dataset(root / "cases.csv")
    assert ds.layout == "csv" and [c.id for c in ds.training] == [c.id for c in msd.training]
    assert [c.id for c in ds.test] == [msd.test[0].id] and ds.labels == msd.labels
    assert validate_dataset(root / "cases.csv").ok


def test_validate_cli_prints_a_table_and_exits_nonzero(tmp_path: Path):
    root = _nnunet(tmp_path / "nn")
    bad = np.zeros((6, 6, 4), np.float32)
    bad[0, 0, 0] = np.nan
    _nifti(root / "imagesTr" / "case0_0000.nii.gz", bad)
    _nifti(root / "labelsTr" / "case1.nii.gz", np.full((6, 6, 4), 9, np.uint8))
    result = CliRunner().invoke(app, ["validate", str(root), "--json", str(tmp_path / "v.json")])
    assert result.exit_code == 1
    assert "NIFTI_NONFINITE" in result.output and "LABEL_VALUES_UNEXPECTED" in result.output
    payload = json.loads((tmp_path / "v.json").read_text())
    assert payload["ok"] is False and {p["case_id"] for p in payload["problems"]} == {"case0", "case1"}
    ok = CliRunner().invoke(app, ["validate", str(_nnunet(tmp_path / "good"))])
    assert ok.exit_code == 0 and "no problems found" in ok.output
