"""Sliding-window prediction of one volume, returned on the input's exact grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import SpatialResample

from medseg.config import Config
from medseg.errors import InputError
from medseg.io.volume import Volume
from medseg.inference.backends import Backend, load_backend
from medseg.models.folder import load_model_dir
from medseg.plan.planner import Plan
from medseg.training.components import select_device
from medseg.transforms.pipeline import IMAGE, build_infer_transforms, volume_to_metatensor


class Predictor:
    """Applies a trained model folder to volumes.

    The image is reoriented, resampled to the model's spacing and normalised; windows are predicted with
    Gaussian blending; the argmax label map (uint8) is resampled back to the input grid with nearest-neighbour
    interpolation, so the output has exactly the input's shape and affine. Labels are resampled rather than
    probabilities: one byte per voxel instead of one float per class.
    """

    def __init__(self, backend: Backend, cfg: Config, plan: Plan, info: dict, device: torch.device) -> None:
        self.backend, self.cfg, self.plan, self.info, self.device = backend, cfg, plan, info, device
        self.labels: dict[int, str] = info["labels"]
        self._preprocess = build_infer_transforms(cfg, plan)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, device: str = "auto", backend: str = "auto") -> "Predictor":
        """Loads a model folder (PyTorch or exported) onto ``device`` (``auto|cpu|cuda|mps``) with ``backend``
        (``auto|torch|onnxruntime|openvino``; see :mod:`medseg.inference.backends`)."""
        dev = select_device(device)
        model, cfg, plan, info = load_model_dir(model_dir, dev)
        return cls(load_backend(Path(model_dir), backend, dev, model, info), cfg, plan, info, dev)

    @torch.no_grad()
    def predict(self, volume: Volume) -> Volume:
        """Segments one volume.

        Args:
            volume: Image ``(C, X, Y, Z)`` (or ``(C, X, Y)`` for a 2D model) with the model's input channels.

        Returns:
            uint8 label map ``(1, X, Y[, Z])`` on the input's grid (same shape and affine).

        Raises:
            InputError: ``CHANNELS_MISMATCH`` / ``SHAPE_INVALID`` when the input does not fit the model.
        """
        expected = int(self.info["in_channels"])
        if volume.array.shape[0] != expected:
            raise InputError(
                "CHANNELS_MISMATCH", f"model expects {expected} channel(s), image has {volume.array.shape[0]}"
            )
        if len(volume.spatial_shape) != int(self.info["spatial_dims"]):
            raise InputError(
                "SHAPE_INVALID",
                f"model is {self.info['spatial_dims']}D, image is {len(volume.spatial_shape)}D {volume.spatial_shape}",
            )
        original = volume_to_metatensor(volume)
        image = self._preprocess({IMAGE: original})[IMAGE]  # MetaTensor (C, X', Y', Z') on the model grid
        logits = sliding_window_inference(
            image.as_tensor()[None].to(self.device),
            roi_size=self.cfg.data.patch_size,
            sw_batch_size=self.cfg.inference.sw_batch_size,
            predictor=self.backend,
            overlap=self.cfg.inference.overlap,
            mode=self.cfg.inference.blend,
        )
        labels = logits.argmax(1).to(torch.float32).cpu()  # (1, X', Y'[, Z'])
        del logits
        on_model_grid = MetaTensor(labels, affine=image.affine)
        back = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float32)(
            on_model_grid, dst_affine=original.affine, spatial_size=volume.spatial_shape
        )
        out = np.asarray(back.as_tensor().numpy().round(), dtype=np.uint8)  # (1, X, Y[, Z])
        return volume.with_array(out, kind="label")
