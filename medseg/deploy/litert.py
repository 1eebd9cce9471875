"""LiteRT (TensorFlow Lite) export of 2D networks: ``medseg export -f tflite [--quantize int8 --calibration DATASET]``.

The network is converted by ``litert-torch`` (the successor of ``ai-edge-torch``) into ``model.tflite``, run by
the LiteRT interpreter (``ai-edge-litert``) on phones, dermatoscopes and other edge devices, and by
``medseg predict`` (``--backend litert``, picked automatically for such a folder). The input shape is fixed at one
sliding-window patch ``(1, C, *data.patch_size)``, which is all the sliding window feeds it.

- float32: logits within ``tolerance`` (1e-3) of PyTorch on random inputs, checked in the interpreter (the
  largest difference is recorded in ``model.json``; over the tolerance the export fails).
- int8: post-training static quantisation (PT2E: symmetric per-channel int8 convolution weights, int8 activations,
  input and output; transposed convolutions and instance normalisation, which the quantizer does not annotate,
  stay float32 between them), its ranges calibrated on patches of the training cases (``--calibration``: the dataset folder the model was trained
  on), preprocessed exactly as prediction preprocesses them. The share of calibration-patch pixels whose label
  (argmax) equals PyTorch's is recorded (``label_agreement``); under ``min_agreement`` (0.99) the export fails.

Transposed convolutions with padding (MONAI UNet's upsampling: kernel 3, stride 2, padding 1, output padding 1)
have no LiteRT kernel; they are converted as an unpadded transposed convolution followed by a crop, which is the
same function (checked by the parity above). 3D networks are refused (``EXPORT_UNSUPPORTED``): LiteRT has no 3D
convolution kernels for edge devices.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg.errors import ModelError, require_extra
from medseg.inference.backends import LITERT_FILE, LiteRTInterpreter
from medseg.models.folder import CONFIG, PLAN, ModelFolder


class CroppedTranspose(nn.Module):
    """A padded transposed convolution as an unpadded one plus a crop (the same function; LiteRT converts it)."""

    def __init__(self, conv: nn.ConvTranspose2d) -> None:
        super().__init__()
        self.pad = tuple(int(p) for p in conv.padding)
        self.extra = tuple(int(p) for p in conv.output_padding)
        if any(e > p for e, p in zip(self.extra, self.pad)):
            raise ModelError("EXPORT_UNSUPPORTED", "a transposed convolution whose output padding exceeds its padding "
                             "cannot be converted for LiteRT")
        self.conv = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, conv.kernel_size,  # type: ignore[arg-type]
                                       conv.stride, 0, 0, conv.groups, conv.bias is not None, conv.dilation)  # type: ignore[arg-type]
        self.conv.load_state_dict(conv.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        h = y.shape[-2] - 2 * self.pad[0] + self.extra[0]
        w = y.shape[-1] - 2 * self.pad[1] + self.extra[1]
        return y[..., self.pad[0]:self.pad[0] + h, self.pad[1]:self.pad[1] + w]


def convertible(net: nn.Module) -> nn.Module:
    """``net`` (in place) with its padded transposed convolutions replaced by :class:`CroppedTranspose`."""
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ConvTranspose2d) and (any(child.padding) or any(child.output_padding)):
                setattr(module, name, CroppedTranspose(child))
    return net


def calibration_patches(folder: ModelFolder, dataset: Path, count: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """``count`` patches ``(1, C, *patch)`` of the training cases, preprocessed as prediction does (a random crop
    per case in turn, padded with the normalised background where a case is smaller)."""
    from medseg.inference.predictor import Predictor
    from medseg.io.dataset import load_dataset
    from medseg.io.readers import read_channels

    cases = load_dataset(dataset).training
    if not cases:
        raise ModelError("EXPORT_FAILED", f"no training cases in {Path(dataset).name} to calibrate int8 ranges on")
    predictor = Predictor.from_model_dir(folder.path, "cpu", tta=False)
    patch = tuple(folder.config.data.patch_size or ())
    rng = np.random.default_rng(seed)
    images = [predictor.model_input(read_channels(case.images))[0] for case in cases[:count]]
    patches = []
    for i in range(count):
        image = images[i % len(images)]
        pad = [(0, max(0, p - s)) for p, s in zip(patch, image.shape[1:])]
        if any(after for _, after in pad):
            flat = [x for pair in reversed(pad) for x in pair]
            image = torch.nn.functional.pad(image, flat, value=float(image.min()))
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape[1:], patch)]
        patches.append(image[(slice(None), *[slice(a, a + p) for a, p in zip(start, patch)])][None].contiguous())
    return patches


def export_litert(model_dir: Path, out: Path, quantize: str | None, calibration: Path | None,
                  tolerance: float = 1e-3, min_agreement: float = 0.99) -> Path:
    """Writes a LiteRT model folder (``model.tflite`` beside the source's config, plan and model.json).

    Raises:
        ModelError: ``EXPORT_UNSUPPORTED`` (a 3D network), ``EXPORT_FAILED`` (the converter failed),
            ``EXPORT_PARITY_FAILED``, ``MODEL_DIR_INVALID`` (an exported folder).
        ConfigError: ``EXTRA_MISSING`` without ``medseg[litert]``; ``CONFIG_MISSING_KEY`` for int8 without a
            calibration dataset.
    """
    from medseg.deploy.export import _FinalOutput, write_exported_info
    from medseg.errors import ConfigError, describe

    folder = ModelFolder.read(model_dir)
    if folder.spatial_dims != 2:
        raise ModelError("EXPORT_UNSUPPORTED", f"LiteRT export is for 2D networks; {folder.name} is "
                         f"{folder.spatial_dims}D", "export 3D networks to ONNX or OpenVINO (--format onnx)")
    if quantize == "int8" and calibration is None:
        raise ConfigError("CONFIG_MISSING_KEY", "int8 LiteRT export calibrates on training cases: give --calibration DATASET")
    net = folder.load_network("cpu")
    if net is None:
        raise ModelError("MODEL_DIR_INVALID", f"{folder.name} is already an exported ({folder.format}) model folder")
    import os
    import warnings

    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")  # its step-by-step console lines (set y to see them)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the converter's C++ start-up lines
    require_extra("litert_torch", "litert", "LiteRT export")
    import litert_torch

    patch = tuple(folder.config.data.patch_size or ())
    wrapped = convertible(_FinalOutput(net).eval())
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, folder.in_channels, *patch, generator=g)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    target = tmp / LITERT_FILE
    try:
        patches = calibration_patches(folder, calibration) if quantize == "int8" and calibration else []
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's pytree deprecations
            if quantize == "int8":
                from litert_torch.quantize import pt2e_quantizer, quant_config
                from torchao.quantization.pt2e import quantize_pt2e

                quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
                    pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
                graph = quantize_pt2e.prepare_pt2e(torch.export.export(wrapped, (sample,)).module(), quantizer)
                for x in patches:
                    graph(x)
                graph = quantize_pt2e.convert_pt2e(graph, fold_quantize=False)
                edge = litert_torch.convert(graph, (sample,), quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer))
            else:
                edge = litert_torch.convert(wrapped, (sample,))
            edge.export(str(target))
    except (ModelError, ConfigError):
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError("EXPORT_FAILED", f"LiteRT conversion of {folder.config.model.name} failed: "
                         f"{describe(error, limit=2000)}", "predict with the model folder itself (--backend torch)") from error
    interpreter = LiteRTInterpreter(target)
    with torch.no_grad():
        if quantize == "int8":
            inputs = patches
            score = float(np.mean([float((interpreter(x).argmax(1) == wrapped(x).argmax(1)).float().mean()) for x in inputs]))
            parity: dict = {"label_agreement": score, "inputs": len(inputs), "on": "calibration patches"}
            failed = score < min_agreement
        else:
            inputs = [sample, torch.randn(1, folder.in_channels, *patch, generator=g) * 3]
            score = max(float((interpreter(x) - wrapped(x)).abs().max()) for x in inputs)
            parity = {"max_abs_logit_diff": score, "inputs": len(inputs), "on": "random inputs"}
            failed = score > tolerance
    for name in (CONFIG, PLAN):
        shutil.copy2(folder.path / name, tmp / name)
    write_exported_info(tmp, folder.info, "tflite", target, folder.name, quantization=quantize, exporter="litert-torch",
                        input_shape=[1, folder.in_channels, *patch], parity=parity)
    if failed:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError("EXPORT_PARITY_FAILED", f"the LiteRT model differs from PyTorch: {parity}",
                         "export float32 (no --quantize), or calibrate on more training cases")
    tmp.rename(out)
    return out
