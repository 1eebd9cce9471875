"""Contract every registered network passes, plus registry behaviour."""

import pytest
import torch

from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.models import MODELS, build_model


SMALL = {  # the smallest sensible network of each registered model
    "unet": ["model.channels=[4, 8]", "model.strides=[2]"],
    "dynunet": ["model.channels=[4, 8, 8]", "model.strides=[2, 2]"],
    "unetpp": ["model.channels=[4, 4, 8, 8, 8]", "model.strides=[2, 2, 2, 2]"],
}
SIZE = {"unet": 16, "dynunet": 16, "unetpp": 32}  # smallest input keeping a bottleneck of more than one voxel


def test_every_registered_model_has_contract_settings():
    assert set(SMALL) == set(MODELS.names())


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_forward_backward_shape_contract(name: str, spatial_dims: int):
    cfg = load_config("smoke", [f"model.name={name}", *SMALL[name]]).model
    torch.manual_seed(0)
    net = build_model(cfg, spatial_dims, in_channels=2, out_channels=3)
    size = SIZE[name]
    x = torch.randn(2, 2, *([size] * spatial_dims), requires_grad=True)
    y = net(x)
    assert y.shape == (2, 3, *([size] * spatial_dims))
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_unknown_model_lists_valid_and_suggests():
    cfg = load_config("smoke", ["model.name=unt"]).model
    with pytest.raises(ConfigError) as info:
        build_model(cfg, 3, 1, 2)
    assert info.value.code == "CONFIG_UNKNOWN_NAME"
    assert "unet" in info.value.message and info.value.hint == "did you mean 'unet'?"


def test_strides_must_fit_channels():
    cfg = load_config("smoke", ["model.strides=[2, 2]"]).model
    with pytest.raises(ConfigError, match="strides"):
        build_model(cfg, 3, 1, 2)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unetpp_deep_supervision_outputs(spatial_dims: int):
    cfg = load_config("smoke", ["model.name=unetpp", *SMALL["unetpp"], "model.deep_supervision=true"]).model
    net = build_model(cfg, spatial_dims, 1, 2)
    x = torch.randn(2, 1, *([32] * spatial_dims))
    outputs = net.train()(x)
    assert isinstance(outputs, list) and len(outputs) == 4
    assert all(o.shape == (2, 2, *([32] * spatial_dims)) for o in outputs)
    assert net.eval()(x).shape == (2, 2, *([32] * spatial_dims))


def test_unetpp_requires_five_levels():
    cfg = load_config("smoke", ["model.name=unetpp"]).model
    with pytest.raises(ConfigError, match="5 model.channels"):
        build_model(cfg, 2, 1, 2)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_dynunet_deep_supervision_outputs(spatial_dims: int):
    cfg = load_config("smoke", ["model.name=dynunet", "model.channels=[4, 8, 8, 8]", "model.strides=[2, 2, 2]",
                                "model.deep_supervision=true"]).model
    net = build_model(cfg, spatial_dims, 1, 3)
    x = torch.randn(2, 1, *([16] * spatial_dims))
    outputs = net.train()(x)
    assert isinstance(outputs, list) and len(outputs) == 3  # two deep-supervision heads + the final output
    assert all(o.shape == (2, 3, *([16] * spatial_dims)) for o in outputs)
    assert torch.allclose(net.eval()(x), outputs[-1], atol=1e-5)  # the last one is the network's final output


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", MODELS.names())
def test_odd_sizes_the_plan_allows(name: str, spatial_dims: int):
    """Patches are multiples of the network divisor but need not be powers of two or equal per axis."""
    cfg = load_config("smoke", [f"model.name={name}", *SMALL[name]]).model
    divisor = 2 ** len(cfg.strides)
    size = [divisor * m for m in (3, 2, 2)[:spatial_dims]]
    net = build_model(cfg, spatial_dims, 1, 2).eval()
    assert net(torch.randn(1, 1, *size)).shape == (1, 2, *size)


def test_unet_refuses_deep_supervision():
    cfg = load_config("smoke", ["model.deep_supervision=true"]).model
    with pytest.raises(ConfigError) as info:
        build_model(cfg, 3, 1, 2)
    assert "deep supervision" in info.value.message and "dynunet or unetpp" in info.value.hint
