"""Inference backends for the sliding-window predictor: ``torch`` (PyTorch weights or TorchScript),
``onnxruntime``, ``openvino`` and ``tensorrt`` (ONNX model folders from ``medseg export``), ``litert`` (LiteRT
folders from ``medseg export -f tflite``).

Each backend is a callable mapping a float32 batch ``(B, C, *spatial)`` to logits ``(B, K, *spatial)`` as a
torch tensor. ``auto`` picks the backend that matches the folder: torch for ``weights.pt`` and ``model.ts``,
onnxruntime for ``model.onnx``, litert for ``model.tflite``. The non-torch backends are optional extras; a missing
one is reported with the package to install. OpenVINO runs with f32 inference precision (its default on recent
CPUs is bf16, which moves logits by about 0.1).

``tensorrt`` (fp16) and ``tensorrt-fp32`` run an ONNX folder through ONNX Runtime's TensorRT execution provider
(``medseg[tensorrt]``: onnxruntime-gpu and tensorrt), chosen over TensorRT's own Python API because it reads the
ONNX folder medseg already exports and checks, falls back to CUDA kernels for any node TensorRT cannot take, and
caches engines itself. Engines are built on first use with one optimisation profile, batch 1 to the sliding
window's batch at the model's patch size (all the sliding window feeds), and cached in
``MODEL_DIR/tensorrt/<GPU>_trt<version>_<precision>/`` (ONNX Runtime's file names add the model hash and shapes),
so another GPU, TensorRT version or precision builds its own. Without CUDA it is refused (``BACKEND_NEEDS_GPU``).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg.errors import ModelError, require_extra

BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt", "tensorrt-fp32", "litert")
Backend = Callable[[torch.Tensor], torch.Tensor]
LITERT_FILE = "model.tflite"


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
                 info: dict | None = None, threads: int | None = None, batch: int = 1) -> Backend:
    """The backend ``name`` for a model folder (``batch``: the most windows one call gets; TensorRT's profile).

    Raises:
        ModelError: ``BACKEND_UNKNOWN``, ``BACKEND_UNAVAILABLE`` (naming the package), ``BACKEND_NEEDS_EXPORT``,
            ``BACKEND_NEEDS_GPU``.
    """
    if name not in BACKENDS:
        raise ModelError("BACKEND_UNKNOWN", f"unknown backend {name!r}", f"use one of {', '.join(BACKENDS)}")
    fmt = folder_format(model_dir, info)
    if name == "auto":
        name = {"onnx": "onnxruntime", "tflite": "litert"}.get(fmt, "torch")
    if name == "litert" or fmt == "tflite":
        if fmt != "tflite" or name != "litert":
            raise ModelError("BACKEND_NEEDS_EXPORT", f"backend {name} does not run a {fmt} model folder",
                             "litert runs folders written by medseg export -f tflite (and only it runs them)")
        return LiteRTInterpreter(model_dir / LITERT_FILE, threads)
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
    if name.startswith("tensorrt"):
        return _tensorrt(model_dir, path, device, info, batch, fp16=name == "tensorrt")
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


def _tensorrt(model_dir: Path, path: str, device: torch.device, info: dict | None, batch: int, fp16: bool) -> Backend:
    """ONNX Runtime with the TensorRT execution provider (CUDA for what TensorRT cannot take)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ModelError("BACKEND_NEEDS_GPU", "backend tensorrt runs only on an NVIDIA GPU with CUDA, and "
                         f"{'this machine has none' if not torch.cuda.is_available() else f'the device is {device}'}",
                         "use --backend onnxruntime (CPU) or openvino, or predict on a CUDA machine with --device cuda")
    _need("onnxruntime", "onnxruntime-gpu", "tensorrt")
    _need("tensorrt", "tensorrt", "tensorrt")
    import onnx
    import onnxruntime as ort
    import tensorrt

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise ModelError("BACKEND_UNAVAILABLE", "this onnxruntime has no TensorRT execution provider",
                         "pip install onnxruntime-gpu tensorrt (or medseg[tensorrt]) in place of onnxruntime")
    from medseg.config import load_config
    from medseg.models.folder import CONFIG, ModelFolder

    # a caller that read and checked the folder passes its model.json: then only the config is read (no second hash)
    channels = int((info if info is not None else ModelFolder.read(model_dir).info)["in_channels"])
    patch = "x".join(str(int(p)) for p in load_config(model_dir / CONFIG).data.patch_size or ())
    input_name = onnx.load(path, load_external_data=False).graph.input[0].name
    gpu = "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(device))
    cache = model_dir / "tensorrt" / f"{gpu}_trt{tensorrt.__version__}_{'fp16' if fp16 else 'fp32'}"
    cache.mkdir(parents=True, exist_ok=True)
    index = device.index if device.index is not None else torch.cuda.current_device()
    trt = {"device_id": index, "trt_fp16_enable": fp16, "trt_engine_cache_enable": True,
           "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
           "trt_profile_min_shapes": f"{input_name}:1x{channels}x{patch}",
           "trt_profile_opt_shapes": f"{input_name}:{batch}x{channels}x{patch}",
           "trt_profile_max_shapes": f"{input_name}:{batch}x{channels}x{patch}"}
    session = ort.InferenceSession(path, providers=[("TensorrtExecutionProvider", trt),
                                                    ("CUDAExecutionProvider", {"device_id": index})])

    def run(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {input_name: np.ascontiguousarray(x.float().cpu().numpy(), np.float32)})[0]
        return torch.from_numpy(out).to(x.device)

    return run


class LiteRTInterpreter:
    """A ``model.tflite`` in the LiteRT interpreter: float32 ``(B, C, *patch)`` in, float32 logits out (int8 inputs
    and outputs are quantised and dequantised with the model's own scale and zero point)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import os

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the runtime's C++ start-up lines
        require_extra("ai_edge_litert.interpreter", "litert", "the LiteRT backend")
        from ai_edge_litert.interpreter import Interpreter as LiteRT

        self.runtime = LiteRT(model_path=str(path), num_threads=threads)
        self.runtime.allocate_tensors()
        self.input = self.runtime.get_input_details()[0]
        self.output = self.runtime.get_output_details()[0]
        self.shape = tuple(int(s) for s in self.input["shape"])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().cpu().numpy(), np.float32)
        if tuple(x.shape[1:]) != self.shape[1:]:
            raise ModelError("MODEL_DIR_INVALID", f"this LiteRT model takes windows of {list(self.shape[2:])} "
                             f"({self.shape[1]} channel(s)), not {list(x.shape[1:])}",
                             "predict with the model's own data.patch_size (its config.yaml)")
        return torch.from_numpy(np.stack([self._one(item[None]) for item in x]))

    def _one(self, x: np.ndarray) -> np.ndarray:
        if self.input["dtype"] == np.int8:
            scale, zero = self.input["quantization"]
            x = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
        self.runtime.set_tensor(self.input["index"], x)
        self.runtime.invoke()
        y = self.runtime.get_tensor(self.output["index"])[0]
        if self.output["dtype"] == np.int8:
            scale, zero = self.output["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)


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
