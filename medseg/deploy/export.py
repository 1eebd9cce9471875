"""``medseg export``: a model folder variant whose network is ONNX or TorchScript.

The exported folder keeps ``config.yaml``, ``plan.json`` and ``model.json`` (labels, provenance) so that
``medseg predict -m EXPORTED`` loads it directly, and adds ``model.onnx`` or ``model.ts``. Batch and spatial
sizes are dynamic. Every export is checked against PyTorch on random inputs of several sizes (max |logit
difference| recorded in ``model.json``; over ``tolerance`` the export fails). ``quantize="int8"`` additionally
applies ONNX Runtime's dynamic int8 quantisation (weights int8, activations quantised at run time).

ONNX is written by PyTorch's dynamo exporter first. Where ``torch.export`` cannot keep a network's shape arithmetic
symbolic (nnU-Net's residual encoder fails to export; SegFormer's reshapes export with the traced size baked in and
fail at any other), the parity check over several sizes catches it and the TorchScript-based exporter (dynamic
axes) writes the graph instead; ``model.json`` records which (``exporter``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from medseg.config import planned
from medseg.errors import ModelError, OutputError, describe
from medseg.fsutil import sha256_file
from medseg.models.contract import final_output
from medseg.models.folder import CONFIG, INFO, NETWORK_HASH, PLAN, load_model_dir, write_info

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}


class _FinalOutput(torch.nn.Module):
    """Exports only the final output (no deep-supervision heads)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return final_output(self.net(x))


def parity_inputs(info: dict, divisor: int) -> list[torch.Tensor]:
    """Random inputs of several sizes (multiples of the network's divisor, unequal axes, batch 1 and 2)."""
    g = torch.Generator().manual_seed(0)
    dims, channels = int(info["spatial_dims"]), int(info["in_channels"])
    shapes = [(1, [3, 2, 2]), (2, [2, 4, 3])]
    return [torch.randn(b, channels, *[divisor * m for m in mult[:dims]], generator=g) for b, mult in shapes]


def _require(module: str, package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ModelError("BACKEND_UNAVAILABLE", f"exporting needs the {package} package", f"pip install {package} (or medseg[onnx])")


def _write(fmt: str, exporter: str, wrapped: torch.nn.Module, inputs: list[torch.Tensor], target: Path,
           quantize: str | None) -> None:
    """Writes the network file with one exporter: ``trace`` (TorchScript), ``dynamo`` or ``torchscript`` (ONNX)."""
    with torch.no_grad():
        if fmt == "torchscript":
            torch.jit.trace(wrapped, inputs[0]).save(str(target))
            return
        _require("onnxscript", "onnxscript")
        _require("onnx", "onnx")
        if exporter == "dynamo":
            dynamic = ({0: torch.export.Dim.AUTO, **{a: torch.export.Dim.AUTO for a in range(2, inputs[0].ndim)}},)
            torch.onnx.export(wrapped, (inputs[0],), str(target), dynamic_shapes=dynamic, dynamo=True, verbose=False)
        else:
            axes = {"image": {0: "batch", **{a: f"axis{a - 1}" for a in range(2, inputs[0].ndim)}}, "logits": {0: "batch"}}
            torch.onnx.export(wrapped, (inputs[0],), str(target), dynamo=False, input_names=["image"],
                              output_names=["logits"], dynamic_axes=axes, opset_version=18)
        if quantize == "int8":
            _require("onnxruntime", "onnxruntime")
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = target.with_name("model.int8.onnx")
            quantize_dynamic(str(target), str(quantized), weight_type=QuantType.QUInt8)
            quantized.replace(target)


def write_exported_info(folder: Path, info: dict, fmt: str, network: Path, source_name: str, **record) -> None:
    """The exported folder's ``model.json``: the source's description (labels, channels, provenance) without its
    weights hash, plus the format, the network file's hash, the source weights' hash and ``record`` (quantization,
    exporter, parity ...)."""
    source = {k: v for k, v in info.items() if k != "weights_sha256"}
    write_info(folder / INFO, {**source, "labels": {str(k): v for k, v in info["labels"].items()}, "format": fmt,
                               NETWORK_HASH: sha256_file(network), "source_weights_sha256": info.get("weights_sha256"),
                               "exported_from": source_name, **record})


def _parity(folder: Path, info: dict, fmt: str, wrapped: torch.nn.Module, inputs: list[torch.Tensor]) -> float:
    """Largest |logit difference| between the exported network in ``folder`` and PyTorch over ``inputs``."""
    from medseg.inference.backends import load_backend

    backend = load_backend(folder, "auto", torch.device("cpu"), info={**info, "format": fmt})
    with torch.no_grad():
        return max(float((backend(x) - wrapped(x)).abs().max()) for x in inputs)


def export_model(model_dir: str | Path, fmt: str, out: str | Path | None = None, quantize: str | None = None,
                 tolerance: float = 1e-4, calibration: str | Path | None = None) -> Path:
    """Exports a model folder.

    Args:
        model_dir: A PyTorch model folder written by training.
        fmt: ``onnx``, ``torchscript`` or ``tflite`` (2D networks: :mod:`medseg.deploy.litert`) -- a model folder
            ``medseg predict`` loads --, or ``mlflow`` (an MLflow pyfunc model directory around the folder:
            :mod:`medseg.deploy.pyfunc`).
        out: Output folder (default ``<model_dir>_<fmt>``); must not exist.
        quantize: ``int8`` for dynamic int8 quantisation (ONNX), full-integer post-training quantisation
            (tflite, calibrated on ``calibration``), or None.
        tolerance: Largest allowed |logit difference| to PyTorch (fp32 ONNX/TorchScript exports).
        calibration: The training dataset folder (tflite int8).

    Returns:
        The exported model folder.

    Raises:
        ModelError: ``MODEL_NOT_FOUND``/``MODEL_DIR_INVALID``, ``EXPORT_FORMAT_UNKNOWN``, ``EXPORT_UNSUPPORTED``,
            ``BACKEND_UNAVAILABLE``, ``EXPORT_FAILED`` (no exporter could write a working graph),
            ``EXPORT_PARITY_FAILED``.
        OutputError: ``OUTPUT_EXISTS``.
    """
    model_dir = Path(model_dir)
    if fmt == "mlflow" and quantize is None:  # an MLflow pyfunc model around the folder: nothing is converted
        from medseg.deploy.pyfunc import save_pyfunc

        return save_pyfunc(model_dir, Path(out) if out else model_dir.with_name(f"{model_dir.name}_mlflow"))
    if fmt not in (*FORMATS, "tflite"):
        raise ModelError("EXPORT_FORMAT_UNKNOWN", f"unknown export format {fmt!r}", f"use one of {', '.join(FORMATS)}, tflite, mlflow")
    if quantize not in (None, "int8") or (quantize and fmt not in ("onnx", "tflite")):
        raise ModelError("EXPORT_FORMAT_UNKNOWN", f"quantize={quantize!r} is only available as int8 with --format onnx or tflite")
    if fmt == "tflite":
        from medseg.deploy.litert import export_litert

        target = Path(out) if out else model_dir.with_name(f"{model_dir.name}_tflite{'_int8' if quantize else ''}")
        if target.exists():
            raise OutputError("OUTPUT_EXISTS", f"{target} exists", "choose another -o or remove it")
        return export_litert(model_dir, target, quantize, Path(calibration) if calibration else None)
    net, cfg, plan, info = load_model_dir(model_dir, "cpu")
    from medseg.models.registry import spec_of

    nnunet = info.get("nnunet") if isinstance(info.get("nnunet"), dict) else None  # imported by import-nnunet
    unsupported = "" if nnunet else spec_of(cfg.model.name).not_exportable
    if unsupported:
        raise ModelError("EXPORT_UNSUPPORTED", f"model {cfg.model.name} cannot be exported: {unsupported}",
                         "predict with the model folder itself (--backend torch)")
    if net is None or info.get("format", "pytorch") != "pytorch":
        raise ModelError("MODEL_DIR_INVALID", f"{model_dir} is already an exported ({info.get('format')}) model folder")
    out = Path(out) if out else model_dir.with_name(f"{model_dir.name}_{fmt}{'_int8' if quantize else ''}")
    if out.exists():
        raise OutputError("OUTPUT_EXISTS", f"{out} exists", "choose another -o or remove it")
    wrapped = _FinalOutput(net).eval()
    if nnunet:  # the plans' total stride per axis; parity inputs are multiples of the largest
        strides = np.array(nnunet["architecture"]["arch_kwargs"]["strides"]).reshape(-1, int(info["spatial_dims"]))
        divisor = int(np.prod(strides, axis=0).max())
    else:
        divisor = int(np.prod(planned(cfg.model.strides, "model.strides"))) * (2 if cfg.model.name == "unetpp" else 1)
    inputs = parity_inputs(info, max(divisor, 4))
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    target = tmp / FORMATS[fmt]
    for name in (CONFIG, PLAN):
        shutil.copy2(model_dir / name, tmp / name)
    # ONNX: the dynamo exporter first; a network whose shape arithmetic torch.export cannot keep symbolic either
    # fails to export or bakes one input size into its graph (SegFormer's reshapes). Both show in the parity check
    # over several sizes, and such a network goes through the TorchScript-based exporter instead.
    exporters = ["dynamo", "torchscript"] if fmt == "onnx" else ["trace"]
    for exporter in exporters:
        try:
            _write(fmt, exporter, wrapped, inputs, target, quantize)
            diff = _parity(tmp, info, fmt, wrapped, inputs)
        except ModelError:  # a missing package: no other exporter helps
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as error:
            if exporter == exporters[-1]:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ModelError("EXPORT_FAILED", f"{fmt} export of {cfg.model.name} failed: {describe(error, limit=2000)}",
                                 "predict with the model folder itself (--backend torch)") from error
            continue
        if quantize is not None or diff <= tolerance or exporter == exporters[-1]:
            break
    write_exported_info(tmp, info, fmt, target, model_dir.resolve().name, quantization=quantize, exporter=exporter,
                        parity={"max_abs_logit_diff": diff, "inputs": [list(x.shape) for x in inputs]})
    if quantize is None and diff > tolerance:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError("EXPORT_PARITY_FAILED", f"{fmt} export differs from PyTorch by {diff:.2e} (> {tolerance:g})")
    tmp.rename(out)
    return out
