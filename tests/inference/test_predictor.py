from pathlib import Path

import numpy as np
import pytest

from medseg.errors import InputError, ModelError
from medseg.inference.predictor import Predictor
from medseg.io.nifti import read_nifti, write_nifti
from medseg.io.volume import Volume
from medseg.models.folder import load_model_dir
from tests.conftest import oblique_affine


@pytest.fixture(scope="module")
def predictor(smoke_model: Path) -> Predictor:
    return Predictor.from_model_dir(smoke_model, "cpu")


@pytest.mark.parametrize(
    "affine",
    [
        oblique_affine((0.8, 0.8, 3.0), 0.0, (1, 1, 1)),
        oblique_affine((0.8, 0.8, 3.0), 0.0, (-1, -1, 1)),
        oblique_affine((0.9, 0.7, 2.2), 12.0, (1, -1, -1)),
    ],
    ids=["RAS", "LPS-like", "oblique-flipped"],
)
def test_prediction_has_input_geometry_after_reload(predictor, tmp_path: Path, make_volume, affine):
    image = make_volume(shape=(37, 33, 11), affine=affine)
    labels = predictor.predict(image)
    assert labels.array.dtype == np.uint8 and labels.array.shape == (1, 37, 33, 11)
    back = read_nifti(write_nifti(labels, tmp_path / "p.nii.gz", np.uint8))
    assert back.spatial_shape == image.spatial_shape
    np.testing.assert_allclose(back.affine, image.affine, atol=1e-4)
    assert set(np.unique(back.array)) <= set(predictor.labels)


def test_flipping_the_input_grid_flips_the_prediction(predictor, tiny_dataset: Path):
    """The same anatomy stored with a flipped axis gives the same world-space labels."""
    vol = read_nifti(tiny_dataset / "imagesTs" / "ct_003.nii.gz")
    flipped_affine = vol.affine.copy()
    flipped_affine[:3, 0] *= -1
    flipped_affine[:3, 3] = vol.affine[:3, :3] @ [vol.spatial_shape[0] - 1, 0, 0] + vol.affine[:3, 3]
    flipped = Volume(vol.array[:, ::-1].copy(), flipped_affine)
    a = predictor.predict(vol).array
    b = predictor.predict(flipped).array[:, ::-1]
    assert (a == b).mean() > 0.995


def test_wrong_channel_count(predictor):
    with pytest.raises(InputError) as info:
        predictor.predict(Volume(np.zeros((2, 8, 8, 8), np.float32), np.eye(4)))
    assert info.value.code == "CHANNELS_MISMATCH"


def test_missing_model_folder(tmp_path: Path):
    with pytest.raises(ModelError) as info:
        Predictor.from_model_dir(tmp_path / "nope", "cpu")
    assert info.value.code == "MODEL_NOT_FOUND"


def test_incomplete_model_folder(tmp_path: Path):
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(ModelError) as info:
        load_model_dir(tmp_path)
    assert info.value.code == "MODEL_DIR_INVALID" and "config.yaml" in info.value.message


def test_model_folder_is_self_describing(smoke_model: Path):
    import json

    info = json.loads((smoke_model / "model.json").read_text())
    assert info["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert {"torch", "monai", "medseg"} <= set(info["versions"]) and len(info["weights_sha256"]) == 64
    assert sorted(p.name for p in smoke_model.iterdir()) == ["config.yaml", "model.json", "plan.json", "weights.pt"]


@pytest.mark.parametrize("damage", ["one_weight_changed", "truncated", "plan_edited"])
def test_damaged_model_folder_is_refused(smoke_model: Path, tmp_path: Path, damage: str):
    import json
    import shutil

    import torch

    folder = tmp_path / "model"
    shutil.copytree(smoke_model, folder)
    if damage == "one_weight_changed":  # still a loadable state dict of the right shapes: only the hash tells
        state = torch.load(folder / "weights.pt", weights_only=True)
        first = next(k for k, v in state.items() if v.is_floating_point())
        state[first].view(-1)[0] += 0.5
        torch.save(state, folder / "weights.pt")
    elif damage == "truncated":
        data = (folder / "weights.pt").read_bytes()
        (folder / "weights.pt").write_bytes(data[: len(data) // 2])
    else:
        plan = json.loads((folder / "plan.json").read_text())
        plan["spacing"] = [s * 2 for s in plan["spacing"]]
        (folder / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ModelError) as info:
        load_model_dir(folder)
    assert info.value.code == "MODEL_CORRUPT"
    assert ("plan.json" if damage == "plan_edited" else "weights.pt") in info.value.message
    load_model_dir(smoke_model)  # the original still loads
