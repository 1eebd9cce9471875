"""medseg's window positions and Gaussian weights are restated without MONAI (so exported models predict without
importing it): they must equal MONAI's own ``dense_patch_slices``/``_get_scan_interval`` and
``compute_importance_map`` exactly."""

from __future__ import annotations

import itertools

import pytest
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers.utils import _get_scan_interval

from medseg.inference.sliding_window import WindowLayout, importance_map

SIZES = [1, 7, 16, 17, 31, 32, 33, 64, 95, 96, 97, 130, 301]


@pytest.mark.parametrize("roi, overlap", list(itertools.product([1, 5, 16, 32, 64, 96], [0.0, 0.25, 0.5, 0.625, 0.9, 0.99])))
def test_window_positions_equal_monai(roi, overlap):
    for size in SIZES:
        for other in (roi, roi + 3):  # a 2D layout whose second axis fits the window exactly or not
            layout = WindowLayout((size, other), (roi, roi), overlap)
            interval = _get_scan_interval(layout.padded, layout.roi, 2, (overlap, overlap))
            monai = sorted(dense_patch_slices(layout.padded, layout.roi, interval), key=lambda s: s[-1].start)
            assert layout.windows() == monai, (size, other, roi, overlap)


def test_window_positions_equal_monai_in_3d():
    for shape, roi in (((512, 512, 300), (96, 96, 64)), ((40, 200, 9), (32, 48, 16)), ((16, 16, 16), (16, 16, 16))):
        for overlap in (0.25, 0.5, 0.75):
            layout = WindowLayout(shape, roi, overlap)
            interval = _get_scan_interval(layout.padded, roi, 3, (overlap,) * 3)
            assert layout.windows() == sorted(dense_patch_slices(layout.padded, roi, interval), key=lambda s: s[-1].start)


@pytest.mark.parametrize("roi", [(96, 96, 64), (64, 64), (128, 128, 32), (5, 9, 3), (1, 16)])
@pytest.mark.parametrize("mode, sigma", [("gaussian", 0.125), ("gaussian", 0.25), ("gaussian", 0.05), ("constant", 0.125)])
def test_importance_map_equals_monai(roi, mode, sigma):
    ours = importance_map(roi, mode, torch.device("cpu"), sigma)
    theirs = compute_importance_map(roi, mode=mode, sigma_scale=sigma, device="cpu", dtype=torch.float32)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


def test_unknown_blend_mode_is_refused():
    with pytest.raises(ValueError, match="blend mode"):
        importance_map((8, 8), "triangular", torch.device("cpu"))


@pytest.mark.parametrize("classes, dtype", [(2, torch.uint8), (3, torch.uint8), (7, torch.int32)])
def test_argmax_labels_equals_torch_argmax_on_strided_slabs_with_ties(classes, dtype):
    from medseg.inference.sliding_window import argmax_labels

    g = torch.Generator().manual_seed(classes)
    values = torch.randint(0, 4, (classes + 1, 9, 8, 12), generator=g).float()[:classes, :, :, 2:10]  # many ties
    labels = argmax_labels(values, dtype)
    assert labels.dtype == dtype
    assert torch.equal(labels.long(), values.argmax(0))  # the first maximum, as torch's
