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
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg.errors import ModelError

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
Backend = Callable[[torch.Tensor], torch.Tensor]


def _need(module: str, package: str, backend: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelError(
            "BACKEND_UNAVAILABLE", f"backend {backend} needs the {package} package", f"pip install {package} (or medseg[{backend}])"
        )


def folder_format(model_dir: Path, info: dict | None = None) -> str:
    """``pytorch``, ``onnx`` or ``torchscript`` (from the folder's checked ``model.json``)."""
    if info is None:
        from medseg.models.folder import ModelFolder

        info = ModelFolder.read(model_dir).info
    return str(info.get("format", "pytorch"))


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
        from medseg.models.contract import final_output

        if device.type == "cpu" and int(info.get("spatial_dims", 3) if info else 3) == 3:
            net = channels_last_3d(net)
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

    settings = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    compiled = ov.Core().compile_model(path, "CPU", settings)
    return lambda x: torch.from_numpy(np.asarray(compiled(np.ascontiguousarray(x.cpu().numpy(), np.float32))[0]))


def channels_last_3d(net: nn.Module) -> nn.Module:
    """``net`` (in place) for CPU inference in channels-last layout: oneDNN runs 3D convolutions up to 2x faster
    that way, and instance normalisation layers are wrapped by :class:`ChannelsLastInstanceNorm` so they do not
    convert the layout back and forth. Same results to float rounding (see ``tests/inference`` and
    ``benchmarks/inference.py``)."""
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.modules.instancenorm._InstanceNorm):
                setattr(module, name, ChannelsLastInstanceNorm(child))
    return net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # Module.to takes it; the stubs omit it


class ChannelsLastInstanceNorm(nn.Module):
    """Instance normalisation of a channels-last tensor in its own layout, for inference.

    PyTorch's CPU kernel copies a channels-last input to channels-first and the result back, which took about a
    third of a small 3D UNet's time. Here the ``(B, C, *spatial)`` tensor is viewed as ``(B, N, C)`` and
    normalised with two-pass statistics (mean, then mean squared deviation: no cancellation), as PyTorch's are
    to float rounding. Other layouts, training mode and running statistics go to the wrapped module.
    """

    def __init__(self, norm: nn.modules.instancenorm._InstanceNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        if (layout is None or norm.training or norm.track_running_stats or x.is_contiguous()
                or not x.is_contiguous(memory_format=layout)):
            return norm(x)
        batch, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
        n = math.prod(spatial)
        rows = x.permute(0, *range(2, x.dim()), 1).reshape(batch, n, channels)  # a view: channels are innermost
        group = math.gcd(n, 64)  # reduce over (n / group, group * channels): vectorises even for 3 channels

        def channel_mean(values: torch.Tensor) -> torch.Tensor:
            return values.reshape(batch, n // group, group * channels).mean(1).view(batch, group, channels).mean(1, keepdim=True)

        centred = rows - channel_mean(rows)
        scale = torch.rsqrt(channel_mean(centred * centred) + norm.eps)
        if norm.affine:
            centred.mul_(scale * norm.weight).add_(norm.bias)
        else:
            centred.mul_(scale)
        return centred.view(batch, *spatial, channels).permute(0, x.dim() - 1, *range(1, x.dim() - 1))
