"""Class 4: bad data is refused, never accepted silently: complex voxels, DICOM rescale slopes of 0, NaN or Inf,
label names changed in model.json, evaluation of undeclared label values or fractional references, and NaN in a
NIfTI transform."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from adversarial_helpers import assert_coded
from dicom_helpers import edit, series

from medseg.errors import MedsegError


@pytest.mark.parametrize("slope, intercept", [("0", "-1024"), ("NaN", "0"), ("Inf", "0"), ("1", "nan"), ("abc", "0")])
def test_dicom_rescale_that_makes_meaningless_voxels_is_refused(tmp_path: Path, cli, slope: str, intercept: str):
    _, files = series(tmp_path / "s", shape=(12, 12, 5), affine=np.diag([1.5, 1.5, 3.0, 1.0]))
    if slope == "abc":  # pydicom will not hold a DS that is no number: written in place of a placeholder
        edit(files[2], RescaleSlope="9.87654")
        files[2].write_bytes(files[2].read_bytes().replace(b"9.87654 ", b"abc     "))
    else:
        edit(files[2], RescaleSlope=slope, RescaleIntercept=intercept)
    run = cli("convert", "-i", tmp_path / "s", "-o", tmp_path / "out.nii.gz")
    assert run.code == 1 and "DICOM_RESCALE_INVALID" in run.err and "Traceback" not in run.err, run.err
    assert not (tmp_path / "out.nii.gz").exists()


def test_a_missing_rescale_is_the_identity(tmp_path: Path):
    from medseg.io.dicom import read_dicom

    volume, files = series(tmp_path / "s", shape=(12, 12, 5), affine=np.diag([1.5, 1.5, 3.0, 1.0]))
    for f in files:
        edit(f, RescaleSlope=None, RescaleIntercept=None)
    assert np.array_equal(read_dicom(tmp_path / "s").array, volume.array)


def test_complex_and_nonfinite_affines_are_refused_by_the_readers(tmp_path: Path):
    from medseg.io.nifti import read_nifti

    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.complex64), affine), tmp_path / "c.nii.gz")
    img = nib.Nifti1Image(np.ones((8, 8, 4), np.int16), affine)
    broken = affine.copy()
    broken[1, 3] = np.nan
    img.set_sform(broken, code=1)
    nib.save(img, tmp_path / "nan.nii.gz")
    for name, code in (("c.nii.gz", "IMAGE_DTYPE_UNSUPPORTED"), ("nan.nii.gz", "AFFINE_NONFINITE")):
        with pytest.raises(MedsegError) as info:
            read_nifti(tmp_path / name)
        assert info.value.code == code


def test_label_names_edited_in_model_json_are_refused(tmp_path: Path, cli, smoke_model: Path, case_folder: Path):
    model = Path(shutil.copytree(smoke_model, tmp_path / "model"))
    info = json.loads((model / "model.json").read_text())
    names = info["labels"]
    swapped = {"0": names["0"], "1": names["2"], "2": names["1"]}
    (model / "model.json").write_text(json.dumps({**info, "labels": swapped}, indent=2))
    assert_coded(cli("predict", "-i", case_folder, "-o", tmp_path / "out", "-m", model), "MODEL_CORRUPT")
    info["in_channels"] = 2
    (model / "model.json").write_text(json.dumps(info, indent=2))
    assert_coded(cli("export", "-m", model, "-f", "torchscript"), "MODEL_CORRUPT")


def _labels(path: Path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), path)


def test_evaluate_refuses_undeclared_values_and_fractional_references(tmp_path: Path, cli):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    mask = np.zeros((16, 16, 8), np.uint8)
    mask[4:10, 4:10, 2:6] = 1
    _labels(ref / "a.nii.gz", mask)
    _labels(pred / "a.nii.gz", mask * 3)  # the prediction names its structure 3, the reference 1
    dataset = tmp_path / "ds"
    dataset.mkdir()
    (dataset / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "organ"}, "training": []}))
    run = cli("evaluate", "-p", pred, "-r", ref, "-o", tmp_path / "e1", "--dataset", dataset)
    assert_coded(run, "LABEL_VALUES_UNEXPECTED")
    assert "[3]" in run.err and "a.nii.gz" in run.err
    assert_coded(cli("evaluate", "-p", pred, "-r", ref, "-o", tmp_path / "e2"), "LABEL_VALUES_UNEXPECTED")
    _labels(ref / "a.nii.gz", mask.astype(np.float32) * 0.7)
    _labels(pred / "a.nii.gz", mask)
    assert_coded(cli("evaluate", "-p", pred, "-r", ref, "-o", tmp_path / "e3"), "LABEL_NOT_INTEGER")
    _labels(ref / "a.nii.gz", mask.astype(np.float32))  # whole numbers stored as floats are fine
    assert cli("evaluate", "-p", pred, "-r", ref, "-o", tmp_path / "e4").code == 0
