"""The plan: configuration values derived from a dataset fingerprint, nnU-Net style.

Rules (each recorded in ``Plan.notes``):

* **Target spacing**: the median spacing per axis. Each axis keeps its own median, so an anisotropic dataset
  (largest/smallest median > 3) is not resampled to its fine in-plane spacing along the slice axis: slices are
  not over-interpolated.
* **2D or 3D**: 2D images give a 2D plan; 3D volumes a 3D plan.
* **Patch size**: start from the median image size at the target spacing (rounded up to the network's divisor),
  then shrink the axis with the largest physical extent until the estimated training memory fits the budget
  (``plan.gpu_memory_gb`` on CUDA, ``plan.cpu_memory_gb`` otherwise). Batch size 2, raised (up to 8) only when the
  patch already covers the median image.
* **Network**: as many levels as halve the smallest patch axis down to at least 4 voxels (at most 6 levels);
  channels start at ``plan.base_channels`` and double per level up to ``plan.max_channels``.
* **Normalisation** per channel from its modality: CT -> ``ct`` (clip to that channel's foreground 0.5/99.5
  percentiles, z-score with its foreground mean/std); R/G/B channels -> ``rgb`` (divide by 255); anything else
  (MR sequences, PET, ...) -> ``zscore`` per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from medseg.config import Config, PlanConfig
from medseg.plan.fingerprint import Fingerprint, JsonRecord

BYTES_PER_VOXEL_PER_BASE_CHANNEL = 64.0  # activations kept for backward, all levels, encoder + decoder (fp32)
MIN_BOTTLENECK = 4


@dataclass
class Plan(JsonRecord):
    """Derived settings; any of them can be pinned in the configuration instead."""

    dims: int
    spacing: list[float]
    patch_size: list[int]
    batch_size: int
    channels: list[int]
    strides: list[int]
    normalization: list[str]  # scheme per channel
    intensity: list[dict[str, float]]  # foreground statistics per channel (used by ``ct``)
    anisotropic: bool
    fingerprint_hash: str
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:  # plans written before per-channel normalisation held one scheme and one stats dict
        if isinstance(self.intensity, dict):
            self.intensity = [self.intensity]
        if isinstance(self.normalization, str):
            self.normalization = [self.normalization] * max(1, len(self.intensity))


def _levels(patch: list[int]) -> int:
    return max(1, min(5, int(math.floor(math.log2(min(patch) / MIN_BOTTLENECK)))))


def _round_up(n: float, divisor: int) -> int:
    return max(divisor, int(math.ceil(n / divisor)) * divisor)


def estimate_memory_gb(patch: list[int], batch: int, base_channels: int) -> float:
    """Rough training memory (GB) of a UNet on ``patch`` (activations dominate)."""
    return batch * float(np.prod(patch)) * base_channels * BYTES_PER_VOXEL_PER_BASE_CHANNEL / 1e9


def make_plan(fp: Fingerprint, cfg: PlanConfig, on_gpu: bool, fixed_levels: int | None = None,
              memory_factor: float = 1.0) -> Plan:
    """Derives a plan from a fingerprint.

    Args:
        fp: The dataset fingerprint.
        cfg: The ``plan`` section of the configuration (memory budgets, channel widths).
        on_gpu: Plan for the GPU memory budget (else the CPU one).
        fixed_levels: Downsampling steps of a network with a fixed depth (UNet++: 4); None = from the patch.
        memory_factor: Training memory per voxel of the network relative to medseg's UNet
            (``medseg.models.registry.MEMORY_FACTOR``, measured by ``benchmarks/models.py``); scales the memory estimate.
    """
    notes: list[str] = []
    spacings = np.array(fp.spacings, dtype=float)  # (N, D)
    shapes = np.array(fp.shapes, dtype=float)
    spacing = np.median(spacings, axis=0)
    anisotropic = bool(spacing.max() / spacing.min() > cfg.anisotropy_ratio)
    notes.append(f"target spacing = median per axis {np.round(spacing, 3).tolist()}")
    if anisotropic:
        notes.append("anisotropic: each axis keeps its own median spacing (no isotropic resampling)")
    median_size = np.median(shapes * spacings, axis=0) / spacing  # voxels at target spacing
    budget = cfg.gpu_memory_gb if on_gpu else cfg.cpu_memory_gb
    patch = [float(s) for s in median_size]
    batch = 2
    while True:
        levels = fixed_levels or _levels([int(p) for p in patch])
        divisor = 2**levels
        rounded = [_round_up(p, divisor) for p in patch]
        if memory_factor * estimate_memory_gb(rounded, batch, cfg.base_channels) <= budget or max(rounded) <= divisor * 2:
            break
        extent = [p * s for p, s in zip(patch, spacing)]
        axis = int(np.argmax(extent))
        patch[axis] *= 0.9
    patch_size = rounded
    notes.append(f"patch {patch_size} (median image {np.round(median_size).astype(int).tolist()}), budget {budget} GB")
    covers = all(p >= m for p, m in zip(patch_size, median_size))
    while covers and batch * 2 <= cfg.max_batch_size and memory_factor * estimate_memory_gb(patch_size, batch * 2, cfg.base_channels) <= budget:
        batch *= 2
    channels = [min(cfg.base_channels * 2**i, cfg.max_channels) for i in range(levels + 1)]
    modality = [fp.modality.get(str(c), "").upper() for c in range(fp.channels)]
    normalization = ["ct" if m == "CT" else "rgb" if m in ("R", "G", "B") else "zscore" for m in modality]
    notes.append(f"normalisation {normalization} from modality {modality}")
    return Plan(
        dims=fp.dims,
        spacing=[round(float(s), 4) for s in spacing],
        patch_size=patch_size,
        batch_size=batch,
        channels=channels,
        strides=[2] * levels,
        normalization=normalization,
        intensity=fp.intensity,
        anisotropic=anisotropic,
        fingerprint_hash=fp.hash(),
        notes=notes,
    )


def apply_plan(cfg: Config, plan: Plan) -> Config:
    """Fills every plan-derived config value left ``null`` from the plan; pinned values stay.

    Network width and depth come from the plan only when both ``model.channels`` and ``model.strides`` are null.
    """
    data, model, train = cfg.data, cfg.model, cfg.train
    intensity = data.intensity  # a null scheme means: per channel, as planned
    new_data = data.model_copy(
        update={
            "spacing": data.spacing or tuple(plan.spacing),
            "patch_size": data.patch_size or tuple(plan.patch_size),
            "intensity": intensity,
        }
    )
    new_model = model
    if model.channels is None and model.strides is None:
        new_model = model.model_copy(update={"channels": tuple(plan.channels), "strides": tuple(plan.strides)})
    new_train = train.model_copy(update={"batch_size": train.batch_size or plan.batch_size})
    resolved = cfg.model_copy(update={"data": new_data, "model": new_model, "train": new_train})
    return Config.model_validate(resolved.model_dump())
