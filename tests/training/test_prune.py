"""`medseg prune`: torch-pruning's structured pruning of a MONAI UNet is the network of a narrower model.channels
holding exactly the kept filters (checked functionally: the pruned network computes what the unpruned one computes
with the removed filters' outputs zeroed), the CLI's pruned and fine-tuned model folders, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.cli import app
from medseg.config import load_config
from medseg.errors import ConfigError, ModelError
from medseg.inference.predictor import Predictor
from medseg.io.readers import read_volume
from medseg.models.folder import ModelFolder
from medseg.models.registry import build_model
from medseg.training.prune import kept, prune_network

pytest.importorskip("torch_pruning")


def _masked(net: torch.nn.Module, removed: list[tuple[str, bool, list[int]]]) -> list:
    """Hooks zeroing, in the unpruned network, the outputs of the filters that pruning removed."""
    layers = dict(net.named_modules())
    hooks = []
    for name, out, idxs in removed:
        layer = layers[name]
        if out and isinstance(layer, torch.nn.modules.conv._ConvNd):
            def zero(_m, _i, y, idxs=idxs):
                y = y.clone()
                y[:, idxs] = 0
                return y
            hooks.append(layer.register_forward_hook(zero))
    return hooks


@pytest.mark.parametrize("dims,res_units,ratio", [(3, 0, 0.5), (3, 2, 0.25), (2, 2, 0.5), (2, 1, 0.3)])
def test_pruned_network_is_the_unpruned_one_without_the_removed_filters(dims, res_units, ratio):
    channels, strides = [8, 16, 24], [2, 2]
    cfg = load_config("smoke", ["model.name=unet", f"model.channels={channels}", f"model.strides={strides}",
                                f"model.num_res_units={res_units}", f"data.patch_size={[16] * dims}",
                                f"data.spacing={[1.0] * dims}"])
    torch.manual_seed(0)
    net = build_model(cfg.model, dims, 2, 3).eval()
    for p in net.parameters():  # trained-like magnitudes (the default init's are too alike to rank)
        p.data.normal_(0, 0.5)
    result = prune_network(net, cfg, 2, 3, dims, ratio)
    assert list(result.cfg.model.channels) == [kept(c, ratio) for c in channels]
    assert result.parameters_after < result.parameters_before
    assert result.removed and all(len(set(i)) == len(i) for _, _, i in result.removed)
    x = torch.randn(2, 2, *[32, 24, 16][:dims], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = net(x)
        hooks = _masked(net, result.removed)
        masked = net(x)
        for hook in hooks:
            hook.remove()
        pruned = result.net(x)
    assert float((masked - plain).abs().max()) > 1e-2  # the removed filters mattered ...
    assert float((pruned - masked).abs().max()) < 1e-4  # ... and only they went
    # the network left alone; the pruned one is what the narrower configuration builds
    assert net(x).shape == pruned.shape
    rebuilt = build_model(result.cfg.model, dims, 2, 3)
    rebuilt.load_state_dict(result.net.state_dict())


def test_refusals():
    cfg = load_config("smoke", ["model.name=unet", "model.channels=[4, 8]"])
    net = build_model(cfg.model, 3, 1, 3).eval()
    for ratio in (0.0, 1.0, -0.2):
        with pytest.raises(ConfigError) as err:
            prune_network(net, cfg, 1, 3, 3, ratio)
        assert err.value.code == "CONFIG_INVALID_VALUE"
    with pytest.raises(ConfigError, match="leaves no channel"):
        prune_network(net, cfg, 1, 3, 3, 0.8)  # int(4 * 0.2) = 0
    other = load_config("smoke", ["model.name=unetpp", "model.channels=[8, 8, 16, 16, 32]", "model.strides=[2, 2, 2, 2]",
                                  "data.patch_size=[32, 32, 32]"])
    with pytest.raises(ModelError) as err:
        prune_network(build_model(other.model, 3, 1, 3).eval(), other, 1, 3, 3, 0.5)
    assert err.value.code == "PRUNE_UNSUPPORTED"


def test_prune_cli_pruned_and_fine_tuned_folders(smoke_model: Path, tiny_dataset: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tmp_path / "pruned"
    result = CliRunner().invoke(app, ["-q", "prune", "-m", str(smoke_model), "--ratio", "0.5", "-o", str(run),
                                      "--dataset", str(tiny_dataset), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    source = ModelFolder.read(smoke_model)
    pruned, tuned = ModelFolder.read(run / "pruned"), ModelFolder.read(run / "model")
    want = [kept(c, 0.5) for c in source.config.model.channels]
    for folder in (pruned, tuned):
        assert list(folder.config.model.channels) == want
        assert folder.info["pruning"]["ratio"] == 0.5
        assert folder.info["pruning"]["source_weights_sha256"] == source.info["weights_sha256"]
        assert folder.labels == source.labels
    assert tuned.info["pruning"]["finetune"] == "distill" and tuned.info["teachers"]
    start = json.loads((run / "pretrained.json").read_text())
    assert start["loaded"] == start["total"]  # fine-tuning started from every pruned tensor
    assert "val_dice_mean" not in pruned.info  # the source's Dice is not the pruned network's
    image = read_volume(sorted((tiny_dataset / "imagesTs").iterdir())[0])
    labels = Predictor.from_model_dir(run / "model", "cpu").predict_case(image, qc=False).labels.array[0]
    assert labels.shape == image.spatial_shape and np.isin(np.unique(labels), [0, 1, 2]).all()

    alone = CliRunner().invoke(app, ["-q", "prune", "-m", str(smoke_model), "-r", "0.25", "-o", str(tmp_path / "alone"),
                                     "--finetune", "none"])
    assert alone.exit_code == 0, alone.output
    assert (tmp_path / "alone" / "pruned").is_dir() and not (tmp_path / "alone" / "model").exists()
    no_data = CliRunner().invoke(app, ["-q", "prune", "-m", str(smoke_model), "-r", "0.25", "-o", str(tmp_path / "x")])
    assert getattr(no_data.exception, "code", None) == "CONFIG_MISSING_KEY" and not (tmp_path / "x").exists()
    bad = CliRunner().invoke(app, ["-q", "prune", "-m", str(smoke_model), "-r", "0.25", "-o", str(tmp_path / "y"),
                                        "--finetune", "sometimes"])
    assert getattr(bad.exception, "code", None) == "CONFIG_INVALID_VALUE"
