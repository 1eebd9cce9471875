"""LiteRT (tflite) export of 2D networks, run in the LiteRT interpreter (ai-edge-litert): float32 logits within 1e-3
of PyTorch, int8 (calibrated on the training cases) labels agreeing with PyTorch's on >= 99 % of pixels, and
`medseg predict` through the litert backend. `make test-litert` runs these in their own venv (CI does;
MEDSEG_REQUIRE_LITERT=1 turns a missing package into a failure); the refusals run everywhere."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import network_sizes
import numpy as np
import pytest
import torch

from medseg.deploy.export import export_model
from medseg.errors import ConfigError, ModelError
from medseg.inference.predictor import Predictor
from medseg.io.readers import read_volume
from medseg.models.folder import ModelFolder

HAVE_LITERT = importlib.util.find_spec("litert_torch") is not None and importlib.util.find_spec("ai_edge_litert") is not None
needs_litert = pytest.mark.skipif(not HAVE_LITERT and not os.environ.get("MEDSEG_REQUIRE_LITERT"),
                                  reason="medseg[litert] is not installed (make test-litert)")


def test_3d_networks_are_refused(smoke_model: Path, tmp_path: Path):
    with pytest.raises(ModelError) as err:
        export_model(smoke_model, "tflite", tmp_path / "out")
    assert err.value.code == "EXPORT_UNSUPPORTED" and not (tmp_path / "out").exists()


def test_int8_needs_calibration_and_missing_extra_is_named(smoke_model_2d: Path, tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        export_model(smoke_model_2d, "tflite", tmp_path / "q", quantize="int8")
    assert err.value.code == "CONFIG_MISSING_KEY"
    if HAVE_LITERT:
        pytest.skip("litert installed: the missing-extra refusal cannot show")
    with pytest.raises(ConfigError) as err:
        export_model(smoke_model_2d, "tflite", tmp_path / "f")
    assert err.value.code == "EXTRA_MISSING" and "medseg[litert]" in str(err.value.hint)


@pytest.fixture(scope="module")
def trained_2d(tiny_dataset_2d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2D UNet trained long enough that its labels are decided (not near-tied logits), ~20 s on 2 cores."""
    from medseg.config import load_config
    from medseg.training.trainer import fit

    cfg = load_config("smoke", [f"data.dataset={tiny_dataset_2d}", "data.spacing=[2.0, 2.0]", "data.patch_size=[32, 32]",
                                "data.intensity.scheme=rgb", "model.channels=[8, 16, 32]", "model.strides=[2, 2]",
                                "train.epochs=6", "train.iterations_per_epoch=15", "train.val_every=6"])
    return fit(cfg, tmp_path_factory.mktemp("run2d_litert"), show_progress=False).model_dir


@needs_litert
@pytest.mark.parametrize("name,dims", [p for p in network_sizes.entries() if p.values[1] == 2])
def test_every_2d_network_converts_within_tolerance(name: str, dims: int, tmp_path: Path):
    """The contract: each 2D registry entry (random weights, smallest size) converts and runs in the interpreter with
    logits within 1e-3 of PyTorch (the export's own check, on two random inputs, fails it otherwise)."""
    from medseg.config import load_config
    from medseg.models import build_model
    from medseg.models.folder import save_model_dir
    from medseg.plan.planner import Plan

    cfg = load_config("smoke", [f"model.name={name}", *network_sizes.SMALL[name], "data.spacing=[1.0, 1.0]",
                                "data.patch_size=[64, 64]"])
    torch.manual_seed(0)
    net = build_model(cfg.model, 2, 1, 3)
    plan = Plan(2, [1.0, 1.0], [64, 64], 2, list(cfg.model.channels), list(cfg.model.strides), ["zscore"], [{}], False, "test")
    source = save_model_dir(tmp_path / name, net, cfg, plan, {"labels": {0: "bg", 1: "a", 2: "b"}, "spatial_dims": 2,
                                                              "in_channels": 1})
    out = export_model(source, "tflite", tmp_path / "tflite")
    assert ModelFolder.read(out).info["parity"]["max_abs_logit_diff"] < 1e-3


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


@needs_litert
def test_float32_export_matches_pytorch_in_the_interpreter(trained_2d: Path, tiny_dataset_2d: Path, tmp_path: Path):
    from medseg.deploy.export import _FinalOutput
    from medseg.inference.backends import LITERT_FILE, LiteRTInterpreter

    out = export_model(trained_2d, "tflite", tmp_path / "f32")
    folder = ModelFolder.read(out)
    assert folder.format == "tflite" and folder.info["quantization"] is None
    assert folder.info["parity"]["max_abs_logit_diff"] < 1e-3
    # independently of the export's own check: other inputs, scaled like normalised images and beyond
    net = _FinalOutput(ModelFolder.read(trained_2d).load_network("cpu")).eval()
    interpreter = LiteRTInterpreter(out / LITERT_FILE)
    g = torch.Generator().manual_seed(7)
    for scale in (1.0, 4.0):
        x = torch.randn(3, folder.in_channels, *folder.config.data.patch_size, generator=g) * scale
        with torch.no_grad():
            assert float((interpreter(x) - net(x)).abs().max()) < 1e-3
    # medseg predict's path (sliding window, litert picked for the folder) gives PyTorch's labels
    image = read_volume(sorted((tiny_dataset_2d / "imagesTs").iterdir())[0])
    ours = Predictor.from_model_dir(out, "cpu").predict_case(image, qc=False).labels.array
    torch_labels = Predictor.from_model_dir(trained_2d, "cpu").predict_case(image, qc=False).labels.array
    assert _agreement(ours, torch_labels) >= 0.999
    with pytest.raises(ModelError) as err:  # a tflite folder is the litert backend's alone
        Predictor.from_model_dir(out, "cpu", backend="onnxruntime")
    assert err.value.code == "BACKEND_NEEDS_EXPORT"


@needs_litert
def test_int8_export_calibrated_on_training_cases(trained_2d: Path, tiny_dataset_2d: Path, tmp_path: Path):
    f32 = (tmp_path / "f32")
    export_model(trained_2d, "tflite", f32)
    out = export_model(trained_2d, "tflite", tmp_path / "int8", quantize="int8", calibration=tiny_dataset_2d)
    info = ModelFolder.read(out).info
    assert info["quantization"] == "int8" and info["parity"]["label_agreement"] >= 0.99
    from ai_edge_litert.interpreter import Interpreter as LiteRT

    runtime = LiteRT(model_path=str(out / "model.tflite"))
    assert runtime.get_input_details()[0]["dtype"] == np.int8  # the input is quantised too
    # every convolution's weights are int8, one scale per output channel (transposed convolutions and instance
    # normalisation stay float32: PT2E's quantizer does not annotate them)
    per_channel = [t for t in runtime.get_tensor_details()
                   if t["dtype"] == np.int8 and len(t["quantization_parameters"]["scales"]) > 1]
    convolutions = [m for m in ModelFolder.read(trained_2d).load_network("cpu").modules() if type(m) is torch.nn.Conv2d]
    assert len(per_channel) >= len(convolutions) > 0
    assert (out / "model.tflite").stat().st_size < (f32 / "model.tflite").stat().st_size
    agreements = []
    for path in sorted((tiny_dataset_2d / "imagesTs").iterdir()) + sorted((tiny_dataset_2d / "imagesTr").iterdir())[:2]:
        image = read_volume(path)
        ours = Predictor.from_model_dir(out, "cpu").predict_case(image, qc=False).labels.array
        torch_labels = Predictor.from_model_dir(trained_2d, "cpu").predict_case(image, qc=False).labels.array
        agreements.append(_agreement(ours, torch_labels))
    assert min(agreements) >= 0.99, agreements
