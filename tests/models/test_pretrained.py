"""model.pretrained: local checkpoints only (safetensors, weights-only torch files, model folders), with a report of
what fitted; every registered network builds and loads weights with the network switched off."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml
from network_sizes import SMALL, dims_of
from safetensors.torch import save_file
from typer.testing import CliRunner

from medseg.cli import app
from medseg.config import load_config
from medseg.errors import InputError, ModelError
from medseg.models import MODELS, build_model
from medseg.models.pretrained import load_pretrained
from medseg.models.registry import missing_package


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _net(name: str, out_channels: int = 3, dims: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(load_config("smoke", [f"model.name={name}", *SMALL[name]]).model, dims, 1, out_channels)


def test_every_registered_network_builds_and_loads_offline(no_network, tmp_path: Path):
    assert set(SMALL) == set(MODELS.names())
    for name in MODELS.names():
        if missing_package(name) and os.environ.get("MEDSEG_REQUIRE_ALL_NETWORKS") != "1":
            continue  # built under `make test-torchvision`
        dims = dims_of(name)[-1]
        source, target = _net(name, dims=dims, seed=1), _net(name, dims=dims, seed=2)
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.clone().contiguous() for k, v in source.state_dict().items()}, str(path))  # DynUNet shares tensors
        report = load_pretrained(target, path)
        assert report.loaded == report.total and report.n_missing == report.n_unexpected == 0, name
        assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values())), name


def test_wrapped_checkpoint_with_other_classes_loads_the_encoder(tmp_path: Path):
    source, target = _net("unet", out_channels=5), _net("unet", out_channels=3, seed=3)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # DDP-style prefix, and a "state_dict" level
    torch.save({"state_dict": state, "epoch": 7}, tmp_path / "ckpt.pt")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_pretrained(target, tmp_path / "ckpt.pt")
    assert report.prefix_removed == "module." and report.n_mismatched >= 1 and report.n_unexpected == 0
    assert report.loaded + report.n_missing == report.total and report.loaded > report.n_missing
    after = target.state_dict()
    for key, value in source.state_dict().items():
        if tuple(value.shape) == tuple(after[key].shape):
            assert torch.equal(after[key], value), key
        else:  # the class layer keeps its own initialisation
            assert torch.equal(after[key], before[key]) and key in report.mismatched


def test_bad_files_are_refused_with_codes(tmp_path: Path):
    net = _net("unet")
    with pytest.raises(InputError) as err:
        load_pretrained(net, tmp_path / "absent.pt")
    assert err.value.code == "PATH_NOT_FOUND"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError) as err:
        load_pretrained(net, tmp_path / "junk.pt")
    assert err.value.code == "PRETRAINED_UNREADABLE"
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_module.pt")  # a whole pickled object: weights_only refuses
    with pytest.raises(ModelError) as err:
        load_pretrained(net, tmp_path / "pickled_module.pt")
    assert err.value.code == "PRETRAINED_UNREADABLE"
    torch.save(_net("segresnet").state_dict(), tmp_path / "other.pt")
    with pytest.raises(ModelError) as err:
        load_pretrained(net, tmp_path / "other.pt")
    assert err.value.code == "PRETRAINED_MISMATCH"


def test_train_starts_from_a_model_folder_and_records_it(smoke_model: Path, tiny_dataset: Path, tmp_path: Path, no_network):
    result = CliRunner().invoke(app, ["train", "-c", "smoke", "-o", str(tmp_path / "run"), "--set", f"data.dataset={tiny_dataset}",
                                      "--set", f"model.pretrained={smoke_model}", "--set", "train.epochs=1",
                                      "--set", "train.lr=1e-9"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    record = json.loads((tmp_path / "run" / "pretrained.json").read_text())
    assert record["file"] == smoke_model.name and record["loaded"] == record["total"] and len(record["sha256"]) == 64
    info = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
    assert info["pretrained"]["sha256"] == record["sha256"]
    # lr 1e-9: the trained weights are the pretrained ones (a fresh initialisation is far from them)
    start = torch.load(smoke_model / "weights.pt", weights_only=True)
    trained = torch.load(tmp_path / "run" / "model" / "weights.pt", weights_only=True)
    floats = [k for k in start if start[k].is_floating_point()]
    assert all(torch.allclose(start[k], trained[k], atol=1e-5) for k in floats)
    fresh = _net("unet").state_dict()
    assert any(not torch.allclose(start[k], fresh[k], atol=1e-3) for k in floats if fresh[k].shape == start[k].shape)
    assert yaml.safe_load((tmp_path / "run" / "model" / "config.yaml").read_text())["model"]["pretrained"] is None
