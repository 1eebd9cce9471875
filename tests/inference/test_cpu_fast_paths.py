"""CPU fast paths of the predictor against the plain computation: windows cut through normalised slabs, and
channels-last networks with layout-preserving instance normalisation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from medseg.inference.backends import ChannelsLastInstanceNorm, channels_last_3d
from medseg.inference.predictor import _window_source
from medseg.inference.sliding_window import WindowLayout


@pytest.mark.parametrize("shape, roi, view", [
    ((30, 26, 40), (16, 16, 16), lambda a: a),                       # F-ordered, no padding
    ((30, 26, 40), (16, 16, 16), lambda a: a[:, ::-1, :, ::-1]),     # reversed axes (negative strides)
    ((10, 12, 40), (16, 16, 16), lambda a: a),                       # padded on two axes
    ((30, 26, 12), (16, 16, 16), lambda a: a[:, :, :, ::-1]),        # padded on the slab axis: one slab
    ((33, 21), (16, 16), lambda a: a[:, :, ::-1]),                   # 2D
    ((30, 26, 40), (16, 16, 16), lambda a: a.astype(">i2")),          # big-endian: through numpy
])
def test_slab_windows_equal_windows_of_the_normalised_padded_image(shape, roi, view):
    rng = np.random.default_rng(0)
    stored = np.asfortranarray(rng.integers(-1000, 1000, (2, *shape)).astype(np.int16))
    image = view(stored)
    image.flags.writeable = False  # read-only input arrays are only read
    layout = WindowLayout(tuple(image.shape[1:]), roi, 0.5)

    def normalise(t: torch.Tensor) -> torch.Tensor:
        return (t.clamp(-160, 240) + 160) / 400

    reference = normalise(torch.tensor(image.astype(np.float32)))
    reference = torch.nn.functional.pad(reference, [p for pair in reversed(layout.pad) for p in pair], value=-7.0)
    source = _window_source(image, layout, -7.0, normalise)
    windows = layout.windows()
    starts = {w[-1].start for w in windows}
    assert (len(starts) > 2) == (shape[-1] == 40)  # long last axis: more slabs than the two kept, so they turn over
    for w in windows:
        got = source(w)
        assert got.dtype == torch.float32 and tuple(got.shape) == (2, *roi)
        assert torch.equal(got, reference[(slice(None), *w)])


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 12, 10, 8), (1, 8, 7, 5, 3), (2, 4, 9, 6)])  # 7*5*3: no grouping
def test_channels_last_instance_norm_matches_pytorch(affine, shape):
    torch.manual_seed(0)
    cls = nn.InstanceNorm3d if len(shape) == 5 else nn.InstanceNorm2d
    norm = cls(shape[1], affine=affine).eval()
    if affine:
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    x = torch.randn(shape) * 5 + 40  # large mean: a one-pass variance would lose digits here
    layout = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    fast = ChannelsLastInstanceNorm(norm)
    with torch.inference_mode():
        got = fast(x.contiguous(memory_format=layout))
        ref = norm(x)
        assert got.is_contiguous(memory_format=layout)
        assert (got - ref).abs().max().item() < 1e-4
        assert torch.equal(fast(x), ref)  # channels-first input goes to PyTorch's kernel


@pytest.mark.parametrize("name", ["unet", "dynunet"])
def test_channels_last_network_matches_the_original(name):
    from monai.networks.nets import DynUNet, UNet

    torch.manual_seed(0)
    if name == "unet":
        net = UNet(3, 1, 3, (8, 16, 32), (2, 2), num_res_units=1)
    else:  # nnU-Net style: affine instance norm
        net = DynUNet(3, 1, 3, [3, 3, 3], [1, 2, 2], [2, 2], norm_name=("INSTANCE", {"affine": True}))
    net.eval()
    for module in net.modules():  # non-trivial affine parameters
        if isinstance(module, nn.InstanceNorm3d) and module.affine:
            nn.init.normal_(module.weight, 1.0, 0.2)
            nn.init.normal_(module.bias, 0.0, 0.2)
    x = torch.randn(2, 1, 24, 20, 16)
    with torch.inference_mode():
        ref = net(x)
        fast = channels_last_3d(copy.deepcopy(net))
        got = fast(x.contiguous(memory_format=torch.channels_last_3d))
    wrapped = [m for m in fast.modules() if isinstance(m, ChannelsLastInstanceNorm)]
    plain = [m for m in net.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)]
    assert len(wrapped) == len(plain) > 0
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("mapping_kind", ["identity", "flipped_and_permuted", "resampled"])
def test_map_back_is_a_view_exactly_when_nothing_is_resampled(mapping_kind):
    from medseg.inference.grid import map_back

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (3, 6, 5, 4)).astype(np.uint8)  # (K, model X, Y, Z)
    if mapping_kind == "identity":
        mapping = [(0, np.arange(6)), (1, np.arange(5)), (2, np.arange(4))]
    elif mapping_kind == "flipped_and_permuted":
        mapping = [(2, np.arange(3, -1, -1)), (0, np.arange(6)), (1, np.arange(4, -1, -1))]
    else:
        mapping = [(0, np.array([0, 0, 1, 2, 3, 4, 5, 5])), (1, np.arange(5)), (2, np.arange(4))]
    got = map_back(labels, mapping)
    expected = np.empty((3, *[len(idx) for _, idx in mapping]), np.uint8)  # element by element, the definition
    for out_index in np.ndindex(*expected.shape[1:]):
        model_index = [0, 0, 0]
        for (axis, idx), i in zip(mapping, out_index):
            model_index[axis] = idx[i]
        expected[(slice(None), *out_index)] = labels[(slice(None), *model_index)]
    assert np.array_equal(got, expected)
    assert np.shares_memory(got, labels) == (mapping_kind != "resampled")
