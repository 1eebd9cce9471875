import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import OutputError
from medseg.inference.predictor import Predictor
from medseg.inference.runner import predict_folder
from medseg.io.nifti import read_nifti


@pytest.fixture(scope="module")
def predictor(smoke_model: Path) -> Predictor:
    return Predictor.from_model_dir(smoke_model, "cpu")


def test_corrupt_case_is_isolated_and_reported(predictor, tiny_dataset: Path, tmp_path: Path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(tiny_dataset / "imagesTs" / "ct_003.nii.gz", inputs / "good.nii.gz")
    (inputs / "broken.nii.gz").write_bytes((tiny_dataset / "imagesTs" / "ct_003.nii.gz").read_bytes()[:500])
    results = predict_folder(predictor, inputs, tmp_path / "out")
    status = {r.case_id: (r.status, r.error_code) for r in results}
    assert status == {"broken": ("failed", "NIFTI_CORRUPT"), "good": ("ok", None)}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["n_ok"] == 1 and manifest["n_failed"] == 1
    good = read_nifti(tmp_path / "out" / "good.nii.gz")
    assert good.same_grid(read_nifti(inputs / "good.nii.gz"))
    assert not (tmp_path / "out" / "broken.nii.gz").exists()


def test_existing_output_needs_overwrite(predictor, tiny_dataset: Path, tmp_path: Path):
    src = tiny_dataset / "imagesTs" / "ct_003.nii.gz"
    out = tmp_path / "out"
    assert predict_folder(predictor, src, out)[0].status == "ok"
    before = (out / "ct_003.nii.gz").read_bytes(), (out / "manifest.json").read_bytes()
    with pytest.raises(OutputError) as info:  # a finished run's folder: refused whole, its record untouched
        predict_folder(predictor, src, out)
    assert info.value.code == "OUTPUT_EXISTS"
    assert ((out / "ct_003.nii.gz").read_bytes(), (out / "manifest.json").read_bytes()) == before
    (out / "manifest.json").unlink()  # an output no run of this folder recorded: refused for its case
    second = predict_folder(predictor, src, out)[0]
    assert second.status == "failed" and second.error_code == "OUTPUT_EXISTS"
    assert (out / "ct_003.nii.gz").read_bytes() == before[0]
    assert predict_folder(predictor, src, out, overwrite=True)[0].status == "ok"


def test_refuses_to_write_inside_input_tree(predictor, tiny_dataset: Path):
    with pytest.raises(OutputError) as info:
        predict_folder(predictor, tiny_dataset / "imagesTs", tiny_dataset / "imagesTs" / "pred")
    assert info.value.code == "OUTPUT_INSIDE_INPUT"
    assert not (tiny_dataset / "imagesTs" / "pred").exists()


def test_manifest_hash_matches_output(predictor, tiny_dataset: Path, tmp_path: Path):
    import hashlib

    result = predict_folder(predictor, tiny_dataset / "imagesTs", tmp_path)[0]
    assert result.sha256 == hashlib.sha256((tmp_path / "ct_003.nii.gz").read_bytes()).hexdigest()
    assert np.asarray(read_nifti(tmp_path / "ct_003.nii.gz").array).dtype == np.uint8


def test_output_folder_beside_an_input_file(predictor, tiny_dataset: Path, tmp_path: Path):
    scan = tmp_path / "scan.nii.gz"
    shutil.copy(tiny_dataset / "imagesTs" / "ct_003.nii.gz", scan)
    before = scan.read_bytes()
    assert predict_folder(predictor, scan, tmp_path / "pred")[0].status == "ok"  # pred/ beside scan.nii.gz
    assert read_nifti(tmp_path / "pred" / "scan.nii.gz").same_grid(read_nifti(scan))
    with pytest.raises(OutputError) as info:  # the file's own folder: the output would replace the input
        predict_folder(predictor, scan, tmp_path)
    assert info.value.code == "OUTPUT_INSIDE_INPUT" and scan.read_bytes() == before
