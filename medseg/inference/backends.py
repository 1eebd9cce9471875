"""Inference backends for the sliding-window predictor: ``torch`` (PyTorch weights or TorchScript),
``onnxruntime`` and ``openvino`` (ONNX model folders from ``medseg export``).

Each backend is a callable mapping a float32 batch ``(B, C, *spatial)`` to logits ``(B, K, *spatial)`` as a
torch tensor. ``auto`` picks the backend that matches the folder: torch for ``weights.pt`` and ``model.ts``,
onnxruntime for ``model.onnx``. The non-torch backends are optional extras; a missing one is reported with the
package to install. OpenVINO runs with f32 inference precision (its default on recent CPUs is bf16, which moves
logits by about 0.1).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from medseg.errors import ModelError

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
Backend = Callable[[torch.Tensor], torch.Tensor]


def _need(module: str, package: str, backend: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelError(
            "BACKEND_UNAVAILABLE", f"backend {backend} needs the {package} package", f"pip install {package} (or medseg[{backend}])"
        )


def folder_format(model_dir: Path, info: dict | None = None) -> str:
    """``pytorch``, ``onnx`` or ``torchscript``."""
    info = info if info is not None else json.loads((model_dir / "model.json").read_text())
    return info.get("format", "pytorch")


def load_backend(model_dir: Path, name: str, device: torch.device, net: torch.nn.Module | None = None,
                 info: dict | None = None, threads: int | None = None) -> Backend:
    """The backend ``name`` for a model folder.

    Raises:
        ModelError: ``BACKEND_UNKNOWN``, ``BACKEND_UNAVAILABLE`` (naming the package), ``BACKEND_NEEDS_EXPORT``.
    """
    if name not in BACKENDS:
        raise ModelError("BACKEND_UNKNOWN", f"unknown backend {name!r}", f"use one of {', '.join(BACKENDS)}")
    fmt = folder_format(model_dir, info)
    if name == "auto":
        name = "onnxruntime" if fmt == "onnx" else "torch"
    if name == "torch":
        if fmt == "onnx":
            raise ModelError("BACKEND_NEEDS_EXPORT", f"{model_dir} holds an ONNX model", "use --backend onnxruntime or openvino")
        if fmt == "torchscript":
            module = torch.jit.load(str(model_dir / "model.ts"), map_location=device).eval()
            return lambda x: module(x.to(device))
        if net is None:
            raise ModelError("MODEL_DIR_INVALID", "a PyTorch backend needs the network")
        from medseg.training.components import final_output

        if device.type == "cpu" and int(info.get("spatial_dims", 3) if info else 3) == 3:
            # oneDNN runs 3D convolutions about 1.3x faster in channels-last layout (same results to float
            # rounding; see benchmarks/inference.py)
            net = net.to(memory_format=torch.channels_last_3d)
            return lambda x: final_output(net(x.to(device).contiguous(memory_format=torch.channels_last_3d)))
        return lambda x: final_output(net(x.to(device)))
    if fmt != "onnx":
        raise ModelError("BACKEND_NEEDS_EXPORT", f"backend {name} needs an ONNX model folder",
                         f"run: medseg export -m {model_dir} --format onnx")
    path = str(model_dir / "model.onnx")
    if name == "onnxruntime":
        _need("onnxruntime", "onnxruntime", "onnx")
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {input_name: np.ascontiguousarray(x.cpu().numpy(), np.float32)})[0])
    _need("openvino", "openvino", "openvino")
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda x: torch.from_numpy(np.asarray(compiled(np.ascontiguousarray(x.cpu().numpy(), np.float32))[0]))
