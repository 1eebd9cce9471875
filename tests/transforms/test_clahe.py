import numpy as np
import pytest
import torch
from skimage.exposure import equalize_adapthist

from medseg.transforms.clahe import CLAHE, CLAHEd


def _unit(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    x.flat[0], x.flat[1] = 0.0, 1.0  # exact [0, 1] range: no rescaling difference
    return x


@pytest.mark.parametrize("shape,kernel", [((40, 36), 8), ((24, 20, 16), (8, 8, 4)), ((33, 31), None)])
def test_equals_scikit_image_on_grey_2d_and_3d(shape, kernel):
    x = _unit(shape)
    ours = CLAHE(kernel_size=kernel, clip_limit=0.02, nbins=128)(x[None])[0]
    ref = equalize_adapthist(x, kernel_size=kernel, clip_limit=0.02, nbins=128)
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_equals_scikit_image_on_rgb():
    x = _unit((32, 30, 3), seed=1)
    ours = CLAHE(kernel_size=8, clip_limit=0.03)(np.moveaxis(x, -1, 0))
    ref = equalize_adapthist(x, kernel_size=8, clip_limit=0.03)  # scikit-image's colour path (HSV value)
    np.testing.assert_allclose(np.moveaxis(ours, 0, -1), ref, atol=1e-12)


def test_any_range_is_restored_and_integer_dtype_kept():
    ct = np.random.default_rng(2).integers(-1000, 1500, size=(1, 20, 20, 10)).astype(np.int16)
    out = CLAHE(clip_limit=0.05)(ct)
    assert out.dtype == np.int16 and out.shape == ct.shape
    assert out.min() >= ct.min() and out.max() <= ct.max()
    low, high = float(ct.min()), float(ct.max())
    expected = equalize_adapthist((ct[0] - low) / (high - low), clip_limit=0.05) * (high - low) + low
    np.testing.assert_array_equal(out[0], np.clip(np.round(expected), low, high).astype(np.int16))


def test_tensor_in_tensor_out_float_dtype_and_determinism():
    x = torch.rand(2, 16, 16, dtype=torch.float32) * 300 - 100
    a, b = CLAHE()(x), CLAHE()(x)
    assert isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a.shape == x.shape
    assert torch.equal(a, b)
    assert float(a.min()) >= float(x.min()) - 1e-3 and float(a.max()) <= float(x.max()) + 1e-3


def test_constant_image_unchanged_and_dict_form():
    x = np.full((1, 8, 8), 5.0)
    np.testing.assert_array_equal(CLAHE()(x), x)
    out = CLAHEd(keys="image", clip_limit=0.02)({"image": _unit((12, 12))[None], "label": 1})
    assert out["label"] == 1 and out["image"].shape == (1, 12, 12)


def test_rejects_bad_parameters_and_shapes():
    with pytest.raises(ValueError):
        CLAHE(clip_limit=0)
    with pytest.raises(ValueError):
        CLAHE()(np.zeros((4, 4)))


def test_grey_volume_with_three_slices_is_not_taken_for_colour():
    x = _unit((20, 18, 3), seed=4)
    ours = CLAHE(kernel_size=(6, 6, 3), clip_limit=0.02)(x[None])[0]
    ref = np.moveaxis(equalize_adapthist(np.moveaxis(x, -1, 0), kernel_size=(3, 6, 6), clip_limit=0.02), 0, -1)
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    assert ours.shape == x.shape
