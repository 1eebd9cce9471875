"""Surface metrics against two independent references: MONAI (same surface definition: tight tolerance) and
DeepMind's surface-distance package (area-weighted surfels: agreement within a voxel)."""

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

from medseg.metrics.surface import assd, hausdorff, nsd, surface_distances

SPACINGS = [(1.0, 1.0, 1.0), (0.7, 0.9, 3.0), (2.5, 0.6, 1.2)]


def _random_blob(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    return field > np.percentile(field, rng.uniform(60, 90))


def _t(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask[None, None].astype(np.float32))


def _cases():
    rng = np.random.default_rng(0)
    for i, spacing in enumerate(SPACINGS * 2):
        shape = (24, 20, 14) if i % 2 == 0 else (30, 26)
        spacing = spacing if len(shape) == 3 else spacing[:2]
        ref = _random_blob(rng, shape)
        pred = ndimage.binary_dilation(ref, iterations=int(rng.integers(0, 3))) & _random_blob(rng, shape) | ref & (rng.random(shape) < 0.9)
        yield pytest.param(pred, ref, spacing, id=f"{len(shape)}d-{spacing}")


@pytest.mark.parametrize("pred,ref,spacing", list(_cases()))
def test_matches_monai_within_1e3_mm(pred, ref, spacing):
    d = surface_distances(pred, ref, spacing)
    p, r = _t(pred), _t(ref)
    hd = float(compute_hausdorff_distance(p, r, include_background=True, spacing=list(spacing))[0, 0])
    hd95 = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=list(spacing))[0, 0])
    avg = float(compute_average_surface_distance(p, r, include_background=True, symmetric=True, spacing=list(spacing))[0, 0])
    surf = float(compute_surface_dice(p, r, class_thresholds=[1.5], include_background=True, spacing=list(spacing))[0, 0])
    assert abs(hausdorff(d) - hd) < 1e-3
    assert abs(hausdorff(d, 95) - hd95) < 1e-3
    assert abs(assd(d) - avg) < 1e-3
    assert abs(nsd(d, 1.5) - surf) < 1e-6


@pytest.mark.parametrize("spacing", SPACINGS)
def test_agrees_with_deepmind_surface_distance(spacing):
    """DeepMind weights surfels by area, so values differ by definition; they must agree to within a voxel."""
    sd = pytest.importorskip("surface_distance")
    rng = np.random.default_rng(1)
    ref = _random_blob(rng, (28, 24, 16))
    pred = ndimage.binary_dilation(ref, iterations=1) & ~(rng.random(ref.shape) < 0.02)
    ours = surface_distances(pred, ref, spacing)
    theirs = sd.compute_surface_distances(ref, pred, spacing)
    voxel = max(spacing)
    assert abs(hausdorff(ours) - sd.compute_robust_hausdorff(theirs, 100)) <= voxel
    assert abs(hausdorff(ours, 95) - sd.compute_robust_hausdorff(theirs, 95)) <= voxel
    gt_to_pred, pred_to_gt = sd.compute_average_surface_distance(theirs)
    assert abs(assd(ours) - (gt_to_pred + pred_to_gt) / 2) <= voxel
    assert abs(nsd(ours, 2 * voxel) - sd.compute_surface_dice_at_tolerance(theirs, 2 * voxel)) < 0.1


def test_hand_built_shift_in_mm():
    """A cube shifted by 2 voxels along an axis of 3 mm spacing: HD = 6 mm."""
    ref = np.zeros((20, 20, 20), bool)
    ref[5:12, 5:12, 5:12] = True
    pred = np.roll(ref, 2, axis=2)
    d = surface_distances(pred, ref, (0.5, 0.5, 3.0))
    assert hausdorff(d) == pytest.approx(6.0)
    assert nsd(d, 6.0) == 1.0 and nsd(d, 0.1) < 1.0


def test_identical_masks_have_zero_distance():
    ref = _random_blob(np.random.default_rng(3), (16, 16, 8))
    d = surface_distances(ref, ref, (1.0, 2.0, 3.0))
    assert hausdorff(d) == 0 and assd(d) == 0 and nsd(d, 0.0) == 1.0


def test_empty_mask_gives_none():
    ref = np.zeros((8, 8, 8), bool)
    assert surface_distances(ref, ref, (1, 1, 1)) is None
    ref[2:4, 2:4, 2:4] = True
    assert surface_distances(np.zeros_like(ref), ref, (1, 1, 1)) is None


def test_structure_touching_the_border():
    ref = np.zeros((10, 10, 10), bool)
    ref[:5, :, :] = True  # touches five faces of the image
    pred = np.zeros_like(ref)
    pred[:6, :, :] = True
    d = surface_distances(pred, ref, (1.0, 1.0, 1.0))
    p, r = _t(pred), _t(ref)
    hd = float(compute_hausdorff_distance(p, r, include_background=True)[0, 0])
    assert hausdorff(d) == pytest.approx(hd, abs=1e-3)


@pytest.mark.parametrize("pred,ref,spacing", list(_cases()))
def test_directed_distances_match_medpy_within_1e3_mm(pred, ref, spacing):
    """MedPy uses the same surface voxels but other aggregates; its HD, directed mean distances and the
    percentile of the pooled distances must equal ours computed from the same directed distances."""
    mb = pytest.importorskip("medpy.metric.binary")
    d = surface_distances(pred, ref, spacing)
    assert abs(hausdorff(d) - mb.hd(pred, ref, spacing)) < 1e-3
    assert abs(d.pred_to_ref.mean() - mb.asd(pred, ref, spacing)) < 1e-3
    assert abs(d.ref_to_pred.mean() - mb.asd(ref, pred, spacing)) < 1e-3
    pooled95 = np.percentile(np.concatenate([d.pred_to_ref, d.ref_to_pred]), 95)
    assert abs(pooled95 - mb.hd95(pred, ref, spacing)) < 1e-3
