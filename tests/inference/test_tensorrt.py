"""The TensorRT backend (ONNX Runtime's TensorRT execution provider): refused with BACKEND_NEEDS_GPU where there is
no CUDA (every CI run); on a GPU with medseg[tensorrt] (`gpu` marker, `benchmarks/gpu.sh`) fp16 and fp32 label
maps agree with PyTorch's on >= 99.9 % of voxels, and the engines are cached in the model folder per GPU,
TensorRT version and precision."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.deploy.export import export_model
from medseg.errors import ModelError
from medseg.inference.backends import load_backend
from medseg.inference.predictor import Predictor
from medseg.io.readers import read_volume


@pytest.fixture(scope="module")
def onnx_model(smoke_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(smoke_model, "onnx", tmp_path_factory.mktemp("trt") / "onnx")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["tensorrt", "tensorrt-fp32"])
def test_refused_without_cuda(onnx_model: Path, name: str):
    for device in ("cpu", "cuda"):
        with pytest.raises(ModelError) as err:
            load_backend(onnx_model, name, torch.device(device))
        assert err.value.code == "BACKEND_NEEDS_GPU" and "--backend onnxruntime" in str(err.value.hint)
    with pytest.raises(ModelError) as err:
        Predictor.from_model_dir(onnx_model, "cpu", backend=name)
    assert err.value.code == "BACKEND_NEEDS_GPU"


def test_needs_an_onnx_folder(smoke_model: Path):
    with pytest.raises(ModelError) as err:
        load_backend(smoke_model, "tensorrt", torch.device("cpu"))
    assert err.value.code == "BACKEND_NEEDS_EXPORT"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["tensorrt", "tensorrt-fp32"])
def test_tensorrt_labels_match_pytorch_on_the_gpu(onnx_model: Path, smoke_model: Path, tiny_dataset: Path, name: str):
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("medseg[tensorrt] is not installed")
    image = read_volume(sorted((tiny_dataset / "imagesTs").iterdir())[0])
    reference = Predictor.from_model_dir(smoke_model, "cuda").predict_case(image, qc=False).labels.array
    ours = Predictor.from_model_dir(onnx_model, "cuda", backend=name).predict_case(image, qc=False).labels.array
    agreement = float((ours == reference).mean())
    print(f"{name}: label agreement with PyTorch CUDA {agreement:.5f}")
    assert agreement >= 0.999
    caches = list((onnx_model / "tensorrt").iterdir())
    precision = "fp16" if name == "tensorrt" else "fp32"
    assert any(c.name.endswith(f"_{precision}") and any(c.iterdir()) for c in caches)  # the engine was cached
    again = Predictor.from_model_dir(onnx_model, "cuda", backend=name).predict_case(image, qc=False).labels.array
    assert np.array_equal(again, ours)  # the cached engine gives the same labels
