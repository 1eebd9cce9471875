"""Explanations: where a model looked for each label (``medseg explain``, ``medseg predict --explain``).

Grad-CAM (or Grad-CAM++) through MONAI's ``GradCAM``/``GradCAMpp`` on a chosen layer of the network (default: the
last decoder stage, :func:`default_layer`), with a *segmentation* target: the score of label ``k`` in a window is
the sum of its logits over the voxels the model assigns to ``k`` there (the target of pytorch-grad-cam's
``SemanticSegmentationTarget``), so the map answers "what made the model draw this structure", not "what raised
label k's logit anywhere". MONAI is chosen over pytorch-grad-cam because it is already a dependency, handles 2D
and 3D alike (it upsamples the layer's map to the window) and needs no OpenCV.

Large images are explained window by window on the model grid (the prediction's sliding-window layout, Gaussian
blending of the raw maps), then each label's map is scaled by its maximum to 0..1 and mapped back onto the input
grid (nearest neighbour, as the label map), so positions are the input's. Explanations need the PyTorch network
(not an exported folder) and gradients: about one forward and one backward pass per window and label.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg.errors import ConfigError, InputError, ModelError
from medseg.inference.grid import axis_map, map_back
from medseg.io.volume import Volume
from medseg.models.contract import final_output

METHODS = ("gradcam", "gradcampp")


class SegmentationScore(nn.Module):
    """``(B, K)`` scores of a segmentation network: for each label, its logits summed over the voxels the
    network assigns to it (the assignment is held fixed, no gradient flows through it)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = final_output(self.net(x))  # (B, K, *spatial)
        assigned = torch.nn.functional.one_hot(logits.detach().argmax(1), logits.shape[1]).movedim(-1, 1)
        return (logits * assigned).flatten(2).sum(2)


def default_layer(net: nn.Module, example: torch.Tensor, n_labels: int) -> str:
    """The last decoder stage: the last convolution (in execution order) whose output is a feature map rather than
    the ``n_labels``-channel head, preferring the finest resolution among those.

    Raises:
        ModelError: ``MODEL_DIR_INVALID`` when the network has no such convolution (give ``--layer``).
    """
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    seen: list[tuple[str, tuple[int, ...]]] = []
    handles = [module.register_forward_hook(lambda m, i, o, name=name: seen.append((name, tuple(o.shape))))
               for name, module in net.named_modules() if isinstance(module, convs)]
    try:
        was_training = net.training
        with torch.no_grad():
            net.eval()(example)
        net.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    features = [(name, shape) for name, shape in seen if shape[1] != n_labels]
    if not features:
        raise ModelError("MODEL_DIR_INVALID", "the network has no convolution before its output head to explain",
                         "name one with --layer (a module name of the network)")
    finest = max(int(np.prod(shape[2:])) for _, shape in features)
    return [name for name, shape in features if int(np.prod(shape[2:])) == finest][-1]


def _network(net: nn.Module | None, folder_name: str) -> nn.Module:
    """The PyTorch network of a model folder, or ``MODEL_DIR_INVALID`` for an exported one (no gradients)."""
    if net is None:
        raise ModelError("MODEL_DIR_INVALID", f"{folder_name} holds an exported network, which has no gradients to "
                         "explain", "explain with the PyTorch model folder it was exported from")
    return net


@dataclass
class Explanation:
    """Saliency maps on the input grid: ``maps`` ``(L, *spatial)`` float32 0..1, one channel per label in
    ``labels`` (values), and how they were made."""

    maps: Volume
    labels: list[int]
    facts: dict = field(default_factory=dict)


class Explainer:
    """Grad-CAM of one PyTorch model folder's network over whole images (see the module docstring).

    Args:
        net: The network (eval mode is set for each pass).
        predictor: The :class:`medseg.inference.predictor.Predictor` over it (model grid, normalisation, patch,
            overlap).
        layer: The explained layer's module name; default :func:`default_layer`.
        method: ``gradcam`` or ``gradcampp``.
    """

    def __init__(self, net: nn.Module, predictor, layer: str | None = None, method: str = "gradcam") -> None:
        if method not in METHODS:
            raise ConfigError("OPTION_INVALID", f"unknown explanation method {method!r}", f"use one of {', '.join(METHODS)}")
        from monai.visualize import GradCAM, GradCAMpp

        self.net, self.predictor, self.method = net, predictor, method
        patch = tuple(int(p) for p in predictor.cfg.data.patch_size)
        example = torch.zeros(1, int(predictor.info["in_channels"]), *patch, device=predictor.device)
        self.layer = layer or default_layer(net, example, len(predictor.labels))
        names = dict(net.named_modules())
        if self.layer not in names:
            raise ConfigError("OPTION_INVALID", f"the network has no layer {self.layer!r}",
                             f"some of its layers: {', '.join(list(names)[-8:])}")
        scorer = SegmentationScore(net)
        kind = GradCAM if method == "gradcam" else GradCAMpp
        self.cam = kind(nn_module=scorer, target_layers=f"net.{self.layer}", postprocessing=lambda x: x)

    @classmethod
    def for_predictor(cls, predictor, layer: str | None = None, method: str = "gradcam") -> Explainer:
        """The explainer of a predictor's (first) model (``medseg predict --explain``; an ensemble is explained
        through its first member).

        Raises:
            ModelError: ``MODEL_DIR_INVALID`` when that model is exported (no PyTorch network) or comes from nnU-Net
                (its preprocessing is nnU-Net's, which Grad-CAM's path does not reproduce).
        """
        from medseg.inference.predictor import Predictor

        member = predictor.members[0]
        _refuse_nnunet(member.info, member.model_dir.name)
        net = _network(member.network, member.model_dir.name)
        return cls(net, Predictor.for_network(net, member.cfg, member.plan, member.info, predictor.device), layer, method)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, device: str = "auto", layer: str | None = None,
                       method: str = "gradcam") -> Explainer:
        from medseg.models.nnunet import is_results_folder

        if is_results_folder(model_dir):
            _refuse_nnunet({"nnunet": True}, Path(model_dir).name)
        """Loads a PyTorch model folder.

        Raises:
            ModelError: ``MODEL_DIR_INVALID`` for an exported folder (ONNX, TorchScript): no gradients to follow.
        """
        from medseg.device import select_device
        from medseg.inference.predictor import Predictor
        from medseg.models.folder import ModelFolder

        dev = select_device(device)
        folder = ModelFolder.read(model_dir)
        net = _network(folder.load_network(dev), folder.path.name)
        return cls(net, Predictor.for_network(net, folder.config, folder.plan, folder.info, dev), layer, method)

    def label_values(self, names: Sequence[str] = ()) -> list[int]:
        """Label values for ``names`` (default: every foreground label).

        Raises:
            ConfigError: ``OPTION_INVALID`` for a name the model does not have.
        """
        by_name = {name: value for value, name in self.predictor.labels.items() if value != 0}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ConfigError("OPTION_INVALID", f"the model has no label {unknown[0]!r}",
                             f"its labels: {', '.join(by_name)}")
        return [by_name[n] for n in names] if names else sorted(by_name.values())

    def _window_maps(self, labels: list[int]):
        def run(window: torch.Tensor) -> torch.Tensor:  # (B, C, *patch) -> (B, L, *patch) raw (un-normalised) maps
            with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
                # (also inside a caller's inference mode) the layer's gradient is wanted, not the input's: torch's
                # note that a full backward hook then fires for the module outputs is expected
                warnings.filterwarnings("ignore", "Full backward hook is firing")
                x = window.to(self.predictor.device).clone()
                maps = [self.cam(x, class_idx=k).detach() for k in labels]
            return torch.cat(maps, dim=1).float()

        return run

    def explain(self, volume: Volume, names: Sequence[str] = ()) -> Explanation:
        """Saliency maps of ``names`` (default: every foreground label) for one image, on its grid.

        Raises:
            InputError: ``CHANNELS_MISMATCH``, ``SHAPE_INVALID`` (a 2D model on a 3D image: explain its slices as 2D
                pictures); ConfigError ``OPTION_INVALID`` for an unknown label name.
        """
        from monai.inferers import sliding_window_inference

        labels = self.label_values(names)
        predictor, start = self.predictor, time.perf_counter()
        if volume.array.shape[0] != int(predictor.info["in_channels"]):
            raise InputError("CHANNELS_MISMATCH", f"model expects {predictor.info['in_channels']} channel(s), image has "
                             f"{volume.array.shape[0]}")
        if len(volume.spatial_shape) != predictor.spatial_dims:
            raise InputError("SHAPE_INVALID", f"model is {predictor.spatial_dims}D, image is {len(volume.spatial_shape)}D",
                             "explanations take images of the model's dimensions")
        image, model_affine = predictor.model_input(volume)  # (C, *model grid) normalised
        patch = tuple(int(p) for p in predictor.cfg.data.patch_size)
        with torch.inference_mode(False):
            image = image.clone()
        raw = sliding_window_inference(image[None], patch, 1, self._window_maps(labels), overlap=predictor.overlap,
                                       mode="gaussian", sw_device=predictor.device, device=torch.device("cpu"))
        maps = torch.as_tensor(raw)[0].clamp_min(0).numpy()  # (L, *model grid)
        peaks = maps.reshape(len(labels), -1).max(axis=1)
        maps = maps / np.where(peaks > 0, peaks, 1.0).reshape((-1,) + (1,) * (maps.ndim - 1))
        mapping = axis_map(model_affine, volume.affine, tuple(image.shape[1:]), volume.spatial_shape)
        on_input = np.ascontiguousarray(map_back(maps.astype(np.float32), mapping))
        facts = {"method": self.method, "layer": self.layer, "labels": [predictor.labels[k] for k in labels],
                 "empty": [predictor.labels[k] for k, p in zip(labels, peaks) if p <= 0],
                 "seconds": round(time.perf_counter() - start, 3)}
        return Explanation(volume.with_array(on_input, kind="saliency"), labels, facts)


def safe_name(name: str) -> str:
    """A label name as a file-name part (letters, digits, ``_.-``)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "label"


def saliency_png(image: Volume, saliency: np.ndarray, title: str) -> bytes:
    """A 2D picture (grey or RGB) with its saliency map (0..1, ``(X, Y)``) over it, as the previews draw it."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = np.asarray(image.array, dtype=np.float32)
    fig, ax = plt.subplots(figsize=(4, 4))
    if pixels.shape[0] == 3:
        ax.imshow(np.clip(np.moveaxis(pixels, 0, -1).transpose(1, 0, 2) / max(float(pixels.max()), 1.0), 0, 1))
    else:
        low, high = np.percentile(pixels[0], [1, 99])
        ax.imshow(pixels[0].T, cmap="gray", vmin=low, vmax=max(high, low + 1e-6))
    shown = ax.imshow(np.ma.masked_less(saliency.T, 0.02), cmap="inferno", vmin=0, vmax=1, alpha=0.6)
    fig.colorbar(shown, ax=ax, fraction=0.04, pad=0.02, label="saliency")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def _bytes_writer(data: bytes):
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return write


def write_explanation(explanation: Explanation, image: Volume, out_dir: Path, case_id: str,
                      overwrite: bool = False) -> dict[str, Path]:
    """``OUT/<case>_saliency_<label>.nii.gz`` per label (float32 0..1 on the input grid; and ``.png`` over the
    picture for 2D inputs) and ``OUT/<case>_explain.json`` (method, layer, labels, labels with an empty map).

    Raises:
        OutputError: ``OUTPUT_EXISTS`` (without ``overwrite``), ``OUTPUT_NOT_WRITABLE``, ``DISK_FULL``.
    """
    from medseg.errors import OutputError
    from medseg.fsutil import atomic_write, check_output_dir, write_json
    from medseg.io.nifti import write_nifti

    check_output_dir(out_dir)
    names = explanation.facts["labels"]
    written: dict[str, Path] = {}
    for channel, name in enumerate(names):
        stem = f"{case_id}_saliency_{safe_name(name)}"
        targets = {"nifti": out_dir / f"{stem}.nii.gz"}
        if len(image.spatial_shape) == 2:
            targets["png"] = out_dir / f"{stem}.png"
        for target in targets.values():
            if target.exists() and not overwrite:
                raise OutputError("OUTPUT_EXISTS", f"{target.name} exists", "pass --overwrite to replace it")
        one = explanation.maps.with_array(explanation.maps.array[channel : channel + 1])
        written[f"{name}.nifti"] = write_nifti(one, targets["nifti"], np.float32)
        if "png" in targets:
            png = saliency_png(image, one.array[0], f"{name}: {explanation.facts['method']} on {explanation.facts['layer']}")
            written[f"{name}.png"] = atomic_write(targets["png"], _bytes_writer(png))
    written["facts"] = write_json(out_dir / f"{case_id}_explain.json", {"case": case_id, **explanation.facts})
    return written


def _refuse_nnunet(info: dict, name: str) -> None:
    if info.get("nnunet"):
        raise ModelError("MODEL_DIR_INVALID", f"{name} is an nnU-Net model: Grad-CAM explanations are not available for "
                         "it (its preprocessing is nnU-Net's)", "predict without --explain")
