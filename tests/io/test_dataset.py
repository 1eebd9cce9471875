import json
from pathlib import Path

import pytest

from medseg.errors import DatasetError, InputError
from medseg.io.dataset import load_dataset


def test_msd_dataset_is_discovered(tiny_dataset: Path):
    ds = load_dataset(tiny_dataset)
    assert ds.name == "SyntheticCT"
    assert [c.id for c in ds.training] == ["ct_000", "ct_001", "ct_002"]
    assert [c.id for c in ds.test] == ["ct_003"] and ds.test[0].label is not None


def test_missing_files_are_listed(tmp_path: Path):
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": {"0": "bg", "1": "x"}, "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]})
    )
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    assert info.value.code == "DATASET_FILES_MISSING" and "a" in info.value.message


def test_no_dataset_json(tmp_path: Path):
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    assert info.value.code == "DATASET_JSON_MISSING"


def test_invalid_dataset_json(tmp_path: Path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    assert info.value.code == "DATASET_JSON_INVALID"


def test_missing_folder(tmp_path: Path):
    with pytest.raises(InputError) as info:
        load_dataset(tmp_path / "nope")
    assert info.value.code == "PATH_NOT_FOUND"
