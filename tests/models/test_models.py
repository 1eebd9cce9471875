"""Contract every registered network passes, plus registry behaviour."""

from pathlib import Path

import pytest
import torch
from network_sizes import SMALL, dims_of, entries, needs
from typer.testing import CliRunner

from medseg.cli import app
from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.models import MODELS, build_model

ENTRIES = entries()


SIZE = {"unet": 16, "dynunet": 16, "unetpp": 32, "segresnet": 16, "swinunetr": 64, "resenc_unet": 16, "segformer": 64, "smp": 64,
        "deeplabv3": 32}  # bottleneck of > 1 voxel


def _shape(name: str, spatial_dims: int) -> list[int]:
    """Input of the contract test: SIZE on the first axis, and on the others where cheap (SwinUNETR 3D: 64x32x32)."""
    if name == "swinunetr" and spatial_dims == 3:
        return [64, 32, 32]
    return [SIZE[name]] * spatial_dims


def test_every_registered_model_has_contract_settings():
    assert set(SMALL) == set(MODELS.names()) == set(SIZE)


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs(n)) for n in MODELS.names() if dims_of(n) != (2, 3)])
def test_single_dimension_networks_refuse_the_other(name: str):
    other = ({2, 3} - set(dims_of(name))).pop()
    with pytest.raises(ConfigError) as info:
        build_model(load_config("smoke", [f"model.name={name}", *SMALL[name]]).model, other, 1, 2)
    assert info.value.code == "CONFIG_INVALID_VALUE" and f"{dims_of(name)[0]}D" in info.value.message


@pytest.mark.parametrize("name,spatial_dims", ENTRIES)
def test_forward_backward_shape_contract(name: str, spatial_dims: int):
    cfg = load_config("smoke", [f"model.name={name}", *SMALL[name]]).model
    torch.manual_seed(0)
    net = build_model(cfg, spatial_dims, in_channels=2, out_channels=3)
    shape = _shape(name, spatial_dims)
    x = torch.randn(2, 2, *shape, requires_grad=True)
    y = net(x)
    assert y.shape == (2, 3, *shape)
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


@pytest.mark.parametrize("name,spatial_dims", ENTRIES)
def test_odd_sizes_the_plan_allows(name: str, spatial_dims: int):
    """Patches are multiples of the network divisor but need not be powers of two or equal per axis."""
    cfg = load_config("smoke", [f"model.name={name}", *SMALL[name]]).model
    divisor = 2 ** len(cfg.strides)
    size = [divisor * m for m in (3, 2, 2)[:spatial_dims]]
    if name == "swinunetr" and spatial_dims == 3:
        size = [divisor * 3, divisor, divisor]  # 96 x 32 x 32: odd multiple, affordable on a CPU
    net = build_model(cfg, spatial_dims, 1, 2).eval()
    assert net(torch.randn(1, 1, *size)).shape == (1, 2, *size)


def test_unet_refuses_deep_supervision():
    cfg = load_config("smoke", ["model.deep_supervision=true"]).model
    with pytest.raises(ConfigError) as info:
        build_model(cfg, 3, 1, 2)
    assert "deep supervision" in info.value.message
    assert info.value.hint == "networks with deep supervision: dynunet, resenc_unet, unetpp"  # from their specs


@pytest.mark.parametrize("name", ["segresnet", "swinunetr"])
def test_new_networks_refuse_deep_supervision_and_wrong_strides(name: str):
    cfg = load_config("smoke", [f"model.name={name}", *SMALL[name], "model.deep_supervision=true"]).model
    with pytest.raises(ConfigError, match="deep supervision"):
        build_model(cfg, 3, 1, 2)
    bad = ["model.channels=[4, 8, 16]", "model.strides=[2, 1]"]
    with pytest.raises(ConfigError, match="strides") as info:
        build_model(load_config("smoke", [f"model.name={name}", *bad]).model, 3, 1, 2)
    assert info.value.code == "CONFIG_INVALID_VALUE"


@pytest.mark.parametrize("name, wider", [
    ("segresnet", ["model.channels=[8, 16, 32]", "model.strides=[2, 2]"]),
    ("segresnet", ["model.channels=[4, 8, 16, 32]", "model.strides=[2, 2, 2]"]),
    ("swinunetr", ["model.channels=[24, 48, 96, 192, 384, 768]", "model.strides=[2, 2, 2, 2, 2]"]),
])
def test_config_knobs_change_the_new_networks(name: str, wider: list[str]):
    """model.channels[0] (initial filters / feature size) and the number of levels reach the network."""
    def count(sets: list[str]) -> int:
        return sum(p.numel() for p in build_model(load_config("smoke", [f"model.name={name}", *sets]).model, 3, 1, 2).parameters())

    assert count(wider) > count(SMALL[name])


def test_swinunetr_feature_size_is_rounded_up_to_a_multiple_of_12():
    from monai.networks.nets import SwinUNETR

    cfg = load_config("smoke", ["model.name=swinunetr", "model.channels=[16, 32, 64, 128, 256, 512]",
                                "model.strides=[2, 2, 2, 2, 2]"]).model
    net = build_model(cfg, 2, 1, 2)
    reference = SwinUNETR(in_channels=1, out_channels=2, feature_size=24, spatial_dims=2)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("sets, code, named", [
    (["model.name=unte"], "CONFIG_UNKNOWN_NAME", "did you mean 'unet'"),
    (["loss.name=dice_focall"], "CONFIG_UNKNOWN_NAME", "did you mean 'dice_focal'"),
    (["train.optimizer=adam"], "CONFIG_UNKNOWN_NAME", "adamw"),
    (["model.name=swinunetr", "model.channels=[12,24,48,96,192,384]", "model.strides=[2,2,2,2,2]",
      "data.patch_size=[32,32,32]"], "CONFIG_INVALID_VALUE", "deepest level"),
    (["model.name=segformer"], "CONFIG_INVALID_VALUE", "2D network"),
    (["model.name=resenc_unet", "model.size=XL"], "CONFIG_INVALID_VALUE", "M | L | cpu"),
])
def test_network_loss_and_optimizer_are_checked_before_any_case_is_read(sets, code, named, tmp_path: Path,
                                                                       monkeypatch):
    """Names and what the spec forbids fail at once: no dataset read, no run folder or MLflow store written."""
    from medseg import workflow
    from medseg.io import dataset as dataset_module

    def never(*args, **kwargs):
        raise AssertionError("the dataset was read before the configuration was checked")

    monkeypatch.setattr(dataset_module, "load_dataset", never)
    for module in (dataset_module, workflow):
        monkeypatch.setattr(module, "load_configured", never)
    result = CliRunner().invoke(app, ["train", "-c", "smoke", "-o", str(tmp_path / "run"),
                                      "--set", f"data.dataset={tmp_path}", *[a for s in sets for a in ("--set", s)]])
    assert isinstance(result.exception, ConfigError), result.output + repr(result.exception)
    assert result.exception.code == code and named in result.exception.one_line()
    assert not (tmp_path / "run").exists()
