"""nnU-Net-exact resampling (``medseg.inference.nnunet_exact``) computes scikit-image's ``resize`` - what nnU-Net's
``resample_data_or_seg_to_shape`` calls, in float64 - bit for bit, while it works in slabs of output planes on
threads and keeps no float64 copy of the whole volume. Checked here against scikit-image itself; against nnU-Net's
own function in ``tests/models/test_nnunet_parity.py`` (``make test-torchvision``)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import resize

from medseg.inference import nnunet_exact


def _reference(channel: np.ndarray, target: tuple[int, ...], order: int, dtype) -> np.ndarray:
    return resize(channel.astype(float), target, order, mode="edge", anti_aliasing=False).astype(dtype)


def _ours(channel: np.ndarray, target: tuple[int, ...], order: int, threads: int) -> np.ndarray:
    """medseg's resampling of one channel, isotropic spacing (one 3D resize, no separate z)."""
    return nnunet_exact.resample(channel[None], list(target), [1.0] * 3, [1.0] * 3, order=order, threads=threads)[0]


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape, target", [((23, 19, 11), (31, 14, 11)), ((7, 40, 33), (3, 29, 47))])
def test_slabs_on_threads_equal_scikit_image(order: int, dtype, shape, target):
    rng = np.random.default_rng(order)
    channel = (rng.normal(size=shape) * 300).astype(dtype)
    channel[0, 0, 0] = 3000  # a spike: order 3 overshoots around it and the clip to the input's range has work
    expected = _reference(channel, target, order, dtype)
    assert nnunet_exact._zoom_shift() is not None  # the pinned scipy passes the slab check: the fast path is tested
    for threads in (1, 2, 5):
        out = _ours(channel, target, order, threads)
        assert np.array_equal(out, expected), (threads, float(np.abs(out.astype(float) - expected).max()))


def test_without_scipys_slab_function_scikit_image_is_called(monkeypatch):
    """Where scipy's private zoom_shift is missing or computes differently, the whole-channel resize is used."""
    monkeypatch.setattr(nnunet_exact, "_ZOOM_SHIFT_CHECKED", True)
    monkeypatch.setattr(nnunet_exact, "_ZOOM_SHIFT", None)
    channel = np.random.default_rng(0).normal(size=(12, 9, 8)).astype(np.float32)
    out = _ours(channel, (17, 5, 8), 3, 2)
    assert np.array_equal(out, _reference(channel, (17, 5, 8), 3, np.float32))


def test_a_zoom_function_that_computes_otherwise_is_refused(monkeypatch):
    """The one-time check compares slabs with scipy's whole zoom: a function that shifts the grid fails it."""
    import scipy.ndimage._nd_image as nd

    real = nd.zoom_shift

    def shifted(filtered, zoom, shift, output, *rest):
        return real(filtered, zoom, None if shift is None else shift + 0.25, output, *rest)

    monkeypatch.setattr(nnunet_exact, "_ZOOM_SHIFT_CHECKED", False)
    monkeypatch.setattr(nnunet_exact, "_ZOOM_SHIFT", None)
    monkeypatch.setattr(nd, "zoom_shift", shifted)
    assert nnunet_exact._zoom_shift() is None
    monkeypatch.setattr(nnunet_exact, "_ZOOM_SHIFT_CHECKED", False)
    monkeypatch.setattr(nd, "zoom_shift", real)
    assert nnunet_exact._zoom_shift() is real


def test_separate_z_planes_on_threads_equal_one_thread():
    """The anisotropic path (planes resized, then order 0 along the thick axis in slabs): threads change nothing;
    scikit-image and scipy's map_coordinates over the whole grid, as nnU-Net calls them, are the reference."""
    from scipy.ndimage import map_coordinates

    data = np.random.default_rng(1).normal(size=(1, 6, 30, 26)).astype(np.float32)
    target = [14, 37, 19]
    spacing, new = [4.0, 0.8, 0.8], [1.7, 0.65, 1.1]
    assert nnunet_exact._separate_z(None, spacing, new) == (True, 0)
    here = np.stack([resize(data[0, k].astype(float), target[1:], 3, mode="edge", anti_aliasing=False) for k in range(6)])
    grids = np.mgrid[:14, :37, :19]
    coords = np.array([(float(o) / n) * (g + 0.5) - 0.5 for o, n, g in zip(here.shape, target, grids)])
    expected = map_coordinates(here, coords, order=0, mode="nearest").astype(np.float32)
    for threads in (1, 3):
        ours = nnunet_exact.resample(data, target, spacing, new, order=3, order_z=0, threads=threads)
        assert np.array_equal(ours[0], expected), threads


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_resample_taking_frees_the_input_before_the_last_channel_is_zoomed(monkeypatch, dtype):
    """The memory claim: a CT's float32 volume is not kept beside its float64 spline coefficients (nor nnU-Net's
    float16 logits beside their resampled copy). Checked with a weak reference at the moment the last channel is
    zoomed, and the result equals :func:`resample`'s."""
    import weakref

    data = np.random.default_rng(3).normal(size=(2, 10, 12, 9)).astype(dtype)
    expected = nnunet_exact.resample(data, [13, 7, 9], [1.0, 1.0, 1.0], [0.8, 1.6, 1.0], order=3)
    alive_at_zoom: list[bool] = []
    real = nnunet_exact._zoom_into

    def watching(*args, **kwargs):
        alive_at_zoom.append(ref() is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(nnunet_exact, "_zoom_into", watching)
    box = [data.copy()]
    ref = weakref.ref(box[0])
    ours = nnunet_exact.resample_taking(box, [13, 7, 9], [1.0, 1.0, 1.0], [0.8, 1.6, 1.0], order=3)
    assert box == [] and alive_at_zoom == [True, False]
    assert ours.dtype == expected.dtype and np.array_equal(ours, expected)
