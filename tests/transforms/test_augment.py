"""Spatial augmentation moves image and label together."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.utils import set_determinism

from medseg.config import load_config
from medseg.transforms.pipeline import IMAGE, LABEL, build_augment_transforms

ONLY_SPATIAL = [
    "augment.intensity_prob=0", "augment.gamma_prob=0", "augment.noise_prob=0", "augment.blur_prob=0",
    "augment.lowres_prob=0", "augment.colour_prob=0",
]


def _case(dims: int) -> dict:
    shape = (40, 36, 20) if dims == 3 else (64, 60)
    label = np.zeros(shape, np.float32)
    grid = np.indices(shape)
    centre = np.array(shape)[:, None] / 2
    label[(((grid.reshape(dims, -1) - centre) / (np.array(shape)[:, None] / 4)) ** 2).sum(0).reshape(shape) < 1] = 1
    image = label * 100.0  # an image derived from the label
    affine = torch.eye(dims + 1, dtype=torch.float64)
    return {IMAGE: MetaTensor(torch.from_numpy(image[None]), affine=affine),
            LABEL: MetaTensor(torch.from_numpy(label[None]), affine=affine.clone()), "case_id": "x"}


@pytest.mark.parametrize("dims,kind", [(2, "elastic"), (3, "elastic"), (2, "affine"), (3, "affine")])
def test_image_and_label_stay_aligned(dims: int, kind: str):
    patch = "[32, 32, 16]" if dims == 3 else "[48, 48]"
    spatial = ["augment.elastic_prob=1", "augment.rotate_prob=0", "augment.scale_prob=0"] if kind == "elastic" else [
        "augment.elastic_prob=0", "augment.rotate_prob=1", "augment.scale_prob=1", "augment.rotate_deg=30"]
    cfg = load_config(None, [f"data.patch_size={patch}", "augment.pos_neg_ratio=1", *ONLY_SPATIAL, *spatial])
    set_determinism(0)
    transform = build_augment_transforms(cfg)
    changed = 0
    for _ in range(5):
        out = transform(_case(dims))[0]
        image, label = out[IMAGE].as_tensor()[0].numpy(), out[LABEL].as_tensor()[0].numpy()
        assert set(np.unique(label)) <= {0.0, 1.0}  # labels stay labels (nearest interpolation)
        agree = ((image > 50) == (label > 0.5)).mean()
        assert agree > 0.97, f"{kind} {dims}D: image and label disagree on {1 - agree:.1%} of voxels"
        changed += int(not np.allclose(image, np.round(image / 100) * 100))
    assert changed > 0  # the transform really deformed (interpolated) the image
    set_determinism(None)


def test_patch_size_comes_out():
    cfg = load_config(None, ["data.patch_size=[24, 24, 12]"])
    out = build_augment_transforms(cfg)(_case(3))[0]
    assert tuple(out[IMAGE].shape) == (1, 24, 24, 12) and tuple(out[LABEL].shape) == (1, 24, 24, 12)


def _linear_parts(dims: int, rotate_prob: float, scale_prob: float, draws: int = 40) -> list[np.ndarray]:
    """The voxel-to-world linear part of ``draws`` augmented crops (identity input: crops only translate)."""
    patch = "[32, 32, 16]" if dims == 3 else "[48, 48]"
    cfg = load_config(None, [f"data.patch_size={patch}", "augment.pos_neg_ratio=1", *ONLY_SPATIAL, "augment.flip_prob=0",
                             "augment.elastic_prob=0", "augment.rotate_deg=30", "augment.scale_range=0.2",
                             f"augment.rotate_prob={rotate_prob}", f"augment.scale_prob={scale_prob}"])
    transform = build_augment_transforms(cfg)
    transform.set_random_state(seed=1)
    return [np.asarray(transform(_case(dims))[0][IMAGE].affine)[:dims, :dims] for _ in range(draws)]


@pytest.mark.parametrize("dims", [2, 3])
def test_each_spatial_probability_controls_only_its_own_transform(dims: int):
    off_diagonal = ~np.eye(dims, dtype=bool)

    zoom_only = _linear_parts(dims, rotate_prob=0, scale_prob=1)
    assert all(np.abs(m[off_diagonal]).max() < 1e-6 for m in zoom_only), "rotate_prob 0 must never rotate"
    assert all(np.allclose(np.diag(m), m[0, 0]) for m in zoom_only), "zoom is isotropic"
    assert all(abs(m[0, 0] - 1) > 1e-4 for m in zoom_only)  # scale_prob 1: every draw zooms

    rotate_only = _linear_parts(dims, rotate_prob=1, scale_prob=0)
    assert all(np.allclose(m.T @ m, np.eye(dims), atol=1e-6) for m in rotate_only), "scale_prob 0 must never zoom"
    assert all(np.abs(m[off_diagonal]).max() > 1e-4 for m in rotate_only)  # rotate_prob 1: every draw rotates
    if dims == 3:
        assert all(np.allclose(m[2], [0, 0, 1]) and np.allclose(m[:, 2], [0, 0, 1]) for m in rotate_only)  # in-plane

    both = _linear_parts(dims, rotate_prob=0.5, scale_prob=0.5, draws=200)
    rotated = np.array([np.abs(m[off_diagonal]).max() > 1e-4 for m in both])
    zoomed = np.array([abs(np.linalg.det(m) - 1) > 1e-4 for m in both])
    assert 0.35 < rotated.mean() < 0.65 and 0.35 < zoomed.mean() < 0.65
    assert 0.12 < (rotated & zoomed).mean() < 0.38  # drawn independently: about a quarter both
