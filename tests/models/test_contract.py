"""One contract over every registry entry, in each dimension it supports: odd image sizes through the predictor
land on the input grid, deep supervision where the network has it (and a clear refusal where not), the size
knobs change the network, ONNX export parity within 1e-4 (or EXPORT_UNSUPPORTED with its reason), the CPU
channels-last path of ``medseg predict`` gives the same logits, and ``torch.export`` (what MLflow logging uses)
works or the entry says why not. Forward/backward shapes: tests/models/test_models.py."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from network_sizes import SMALL, entries

from medseg.config import load_config
from medseg.errors import ConfigError, ModelError
from medseg.models import MODELS, build_model
from medseg.models.folder import save_model_dir
from medseg.plan.planner import Plan

ENTRIES = entries()
# knobs that must change the parameter count of each entry (beyond SMALL): width, depth or size
KNOBS = {
    "unet": ["model.channels=[8, 16]"],
    "dynunet": ["model.channels=[8, 8, 16]"],
    "unetpp": ["model.channels=[8, 8, 8, 16, 16]"],
    "segresnet": ["model.channels=[8, 16, 32]"],
    "swinunetr": ["model.channels=[24, 48, 96, 192, 384, 768]"],
    "resenc_unet": ["model.size=M"],
    "segformer": ["model.size=b1"],
    "smp": ["model.encoder=tu-mobilenetv3_small_100"],
    "deeplabv3": ["model.encoder=resnet50"],
}
DEEP_SUPERVISION = {"dynunet", "unetpp", "resenc_unet"}


def _cfg(name: str, dims: int, *extra: str):
    return load_config("smoke", [f"model.name={name}", *SMALL[name], f"data.spacing={[1.0] * dims}",
                                 f"data.patch_size={[_divisor(name) * 2] * dims}", *extra])


def _divisor(name: str) -> int:
    return 2 ** len(load_config("smoke", [f"model.name={name}", *SMALL[name]]).model.strides)


def _net(name: str, dims: int, *extra: str, in_channels: int = 1):
    torch.manual_seed(0)
    return build_model(_cfg(name, dims, *extra).model, dims, in_channels, 3)


def _count(net) -> int:
    return sum(p.numel() for p in net.parameters())


def test_every_entry_is_covered():
    assert set(KNOBS) == set(MODELS.names()) == set(SMALL)
    assert {p.values[0] for p in ENTRIES} == set(MODELS.names())


@pytest.mark.parametrize("name,dims", ENTRIES)
def test_odd_image_sizes_through_the_predictor(name: str, dims: int):
    """An image whose size is no multiple of the network's divisor (and not cubic) is padded, windowed and
    stitched back to exactly its own shape."""
    from medseg.inference.predictor import Predictor

    cfg = _cfg(name, dims)
    net = build_model(cfg.model, dims, 1, 3).eval()
    plan = Plan(dims, [1.0] * dims, list(cfg.data.patch_size), 1, list(cfg.model.channels), list(cfg.model.strides),
                ["zscore"], [{}], False, "test")
    info = {"labels": {0: "bg", 1: "a", 2: "b"}, "spatial_dims": dims, "in_channels": 1}
    predictor = Predictor.for_network(net, cfg, plan, info, torch.device("cpu"))
    shape = [_divisor(name) * 2 + 3, _divisor(name) + 5, 7][:dims]
    labels = predictor.predict_preprocessed(torch.randn(1, *shape))
    assert labels.shape == tuple(shape) and set(np.unique(labels)) <= {0, 1, 2}


@pytest.mark.parametrize("name,dims", ENTRIES)
def test_deep_supervision_where_supported(name: str, dims: int):
    if name not in DEEP_SUPERVISION:
        with pytest.raises(ConfigError, match="deep supervision"):
            _net(name, dims, "model.deep_supervision=true")
        return
    net = _net(name, dims, "model.deep_supervision=true")
    size = [_divisor(name) * 2] * dims
    x = torch.randn(2, 1, *size)
    outputs = net.train()(x)
    assert isinstance(outputs, list) and len(outputs) >= 2
    assert all(o.shape == (2, 3, *size) for o in outputs)
    with torch.no_grad():
        final = net.eval()(x)
    assert final.shape == (2, 3, *size)


@pytest.mark.parametrize("name,dims", ENTRIES)
def test_size_knobs_change_the_network(name: str, dims: int):
    assert _count(_net(name, dims, *KNOBS[name])) > _count(_net(name, dims))


@pytest.mark.parametrize("name,dims", ENTRIES)
def test_onnx_export_parity_or_a_coded_refusal(name: str, dims: int, tmp_path: Path):
    from medseg.deploy.export import export_model
    from medseg.inference.backends import load_backend

    cfg = _cfg(name, dims)
    net = build_model(cfg.model, dims, 1, 3)
    plan = Plan(dims, [1.0] * dims, list(cfg.data.patch_size), 2, list(cfg.model.channels), list(cfg.model.strides),
                ["zscore"], [{}], False, "test")
    folder = save_model_dir(tmp_path / "model", net, cfg, plan, {"labels": {0: "bg", 1: "a", 2: "b"}, "spatial_dims": dims, "in_channels": 1})
    reason = MODELS.get(name).spec.not_exportable
    if reason:
        with pytest.raises(ModelError) as info:
            export_model(folder, "onnx", tmp_path / "onnx")
        assert info.value.code == "EXPORT_UNSUPPORTED" and reason in info.value.message
        return
    backend = load_backend(export_model(folder, "onnx", tmp_path / "onnx"), "onnxruntime", torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    for batch, mult in ((1, (2, 1, 1)), (2, (1, 3, 2))):  # a second batch size and shape than the traced one
        x = torch.randn(batch, 1, *[_divisor(name) * m for m in mult[:dims]], generator=g)
        with torch.no_grad():
            diff = float((backend(x) - net.eval()(x)).abs().max())
        assert diff <= 1e-4, f"{name} {dims}D {tuple(x.shape)}: {diff}"


@pytest.mark.parametrize("name,dims", ENTRIES)
def test_channels_last_cpu_path_matches(name: str, dims: int):
    """The layout ``medseg predict`` uses on a CPU (channels-last, instance norms wrapped in 3D) gives the logits
    of the plain network."""
    from medseg.inference.backends import channels_last_3d

    net = _net(name, dims).eval()
    x = torch.randn(2, 1, *[_divisor(name) * m for m in (2, 1, 1)[:dims]])
    with torch.inference_mode():
        ref = net(x)
        if dims == 3:
            got = channels_last_3d(copy.deepcopy(net))(x.contiguous(memory_format=torch.channels_last_3d))
        else:
            got = copy.deepcopy(net).to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name,dims", ENTRIES)
def test_torch_export_for_mlflow(name: str, dims: int):
    net = _net(name, dims).eval()
    x = torch.randn(2, 1, *[_divisor(name) * 2] * dims)
    program = torch.export.export(net, (x,))
    with torch.no_grad():
        assert (program.module()(x) - net(x)).abs().max().item() < 1e-4


@pytest.mark.parametrize("name,dims", ENTRIES)
def test_batchnorm_running_statistics_follow_within_a_short_run(name: str, dims: int):
    """medseg runs are a few thousand steps: a BatchNorm whose running statistics move by 1 % a step (MobileNetV3's
    TF-style momentum 0.01) still lags after them, and eval-mode predictions were all background (measured with
    deeplabv3). Every BatchNorm of every entry keeps PyTorch's 0.1 (or a cumulative average)."""
    slow = [f"{module_name}: {m.momentum}" for module_name, m in _net(name, dims).named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.momentum is not None and m.momentum < 0.1]
    assert not slow, slow
