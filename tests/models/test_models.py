"""Contract every registered network passes, plus registry behaviour."""

import pytest
import torch

from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.models import MODELS, build_model


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_forward_backward_shape_contract(name: str, spatial_dims: int):
    cfg = load_config("smoke", [f"model.name={name}"]).model
    torch.manual_seed(0)
    net = build_model(cfg, spatial_dims, in_channels=2, out_channels=3)
    x = torch.randn(2, 2, *([16] * spatial_dims), requires_grad=True)
    y = net(x)
    assert y.shape == (2, 3, *([16] * spatial_dims))
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
