"""Prediction resamples to the model's spacing axis by axis (medseg/transforms/resample.py); training resamples
with MONAI's Spacingd. On random oblique, flipped and anisotropic inputs the two must give the same network input
(within float32 rounding: far below the 1e-4 asked for after normalisation) on the same grid, and the same labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.errors import InputError
from medseg.inference.predictor import Predictor
from medseg.io.volume import Volume
from medseg.transforms.pipeline import IMAGE, build_infer_transforms, volume_to_metatensor
from medseg.transforms.resample import index_map, resample_separable
from tests.conftest import oblique_affine


def _monai(predictor: Predictor, volume: Volume) -> tuple[torch.Tensor, np.ndarray]:
    image = build_infer_transforms(predictor.cfg, predictor.plan)({IMAGE: volume_to_metatensor(volume)})[IMAGE]
    return image.as_tensor(), np.asarray(image.affine, np.float64)


def _volumes(seed: int, n: int) -> list[Volume]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        shape = tuple(int(s) for s in rng.integers(18, 48, 3))
        spacing = tuple(float(s) for s in rng.uniform(0.4, 4.0, 3))
        affine = oblique_affine(spacing, float(rng.uniform(0, 45)), tuple(int(f) for f in rng.choice([-1, 1], 3)))
        affine[:3, 3] = rng.uniform(-100, 100, 3)
        array = rng.normal(0, 400, (1, *shape)).astype(np.int16)  # the worst case: noise, no smooth structure
        out.append(Volume(array if rng.random() < 0.5 else np.asfortranarray(array), affine))
    return out


def test_prediction_resampling_equals_the_training_transforms(smoke_model: Path):
    predictor = Predictor.from_model_dir(smoke_model, "cpu")
    assert predictor.streaming
    for volume in _volumes(0, 12):
        ours, affine, normalised = predictor._model_grid(volume)
        theirs, their_affine = _monai(predictor, volume)
        assert normalised and ours.shape == theirs.shape
        np.testing.assert_allclose(affine, their_affine, atol=1e-6)
        assert float((ours - theirs).abs().max()) < 1e-4


def test_labels_equal_the_monai_resampled_path(smoke_model: Path):
    fast = Predictor.from_model_dir(smoke_model, "cpu")
    monai = Predictor.from_model_dir(smoke_model, "cpu")
    monai.streaming = False  # through MONAI's Spacingd, as before
    for volume in _volumes(1, 3):
        a, b = fast.predict_case(volume, qc=True), monai.predict_case(volume, qc=True)
        assert (a.labels.array == b.labels.array).mean() >= 0.9999
        assert a.qc["verdict"] == b.qc["verdict"]


def test_separable_resampling_is_trilinear_with_border_padding():
    """Against torch's grid_sample on the same index map (independent of MONAI)."""
    rng = np.random.default_rng(2)
    image = torch.from_numpy(rng.normal(size=(2, 9, 11, 7)).astype(np.float32))
    xform = np.diag([0.63, 1.7, 0.45, 1.0])
    xform[:3, 3] = [-0.8, 0.3, 2.2]  # reaches outside the image: border padding
    shape = (17, 7, 19)
    ours = resample_separable(image, xform, shape)
    axes = np.meshgrid(*[np.arange(n) * xform[d, d] + xform[d, 3] for d, n in enumerate(shape)], indexing="ij")
    index = np.stack(axes, -1)  # (X, Y, Z, 3) input indices; grid_sample wants (z, y, x) normalised, corners apart
    grid = torch.from_numpy(2 * (index[..., ::-1] + 0.5) / np.array(image.shape[1:])[::-1] - 1).float()[None]
    reference = torch.nn.functional.grid_sample(image[None], grid, mode="bilinear", padding_mode="border",
                                                align_corners=False)[0]
    assert float((ours - reference).abs().max()) < 1e-5


def test_oversized_model_grid_is_refused_before_resampling(smoke_model: Path):
    predictor = Predictor.from_model_dir(smoke_model, "cpu")
    huge = Volume(np.zeros((1, 30, 30, 30), np.int16), np.diag([900.0, 900.0, 900.0, 1.0]))
    with pytest.raises(InputError) as err:
        predictor._model_grid(huge)
    assert err.value.code == "MODEL_GRID_TOO_LARGE"


def test_grids_of_different_directions_are_not_taken_as_separable():
    rotation = oblique_affine((1.0, 1.0, 1.0), 30.0, (1, 1, 1))
    with pytest.raises(ValueError, match="not separable"):
        index_map(np.eye(4), rotation)


def test_any_stored_layout_and_dtype_resamples_alike():
    """Stored arrays are read as they are (F order, reversed axes, big-endian, uint16): the same values within
    float32 rounding as the float32 C-ordered copy."""
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 3000, (1, 20, 30, 10)).astype(np.int16)
    xform = np.diag([0.7, 1.3, 0.5, 1.0])
    xform[:3, 3] = [0.2, -0.4, 1.1]
    shape = (25, 20, 19)
    for view in (stored.astype(">i2"), stored.astype(np.uint16), np.asfortranarray(stored), stored[:, ::-1, :, ::-1],
                 stored.astype(np.float64)):
        reference = resample_separable(torch.from_numpy(np.ascontiguousarray(view, dtype=np.float32)), xform, shape)
        out = resample_separable(view, xform, shape)
        assert out.dtype == torch.float32 and out.is_contiguous()
        assert float((out - reference).abs().max()) <= 3000 * 1e-6
