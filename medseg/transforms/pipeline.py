"""Train / validation / inference transform pipelines (MONAI), built from the configuration and the plan.

Every pipeline starts with the same deterministic preprocessing: read through :mod:`medseg.io`, reorient
to RAS, resample to ``data.spacing`` (images linear, labels nearest), optional CLAHE, intensity normalisation.
That part is cached per case (:mod:`medseg.training.data`). Training then pads, takes foreground-oversampled
random crops and augments. The inference pipeline is the preprocessing alone;
:class:`medseg.inference.predictor.Predictor` maps predictions back to the input grid.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Affine,
    Compose,
    MapTransform,
    Orientationd,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    Spacingd,
    SpatialPadd,
)

from medseg.config import Config
from medseg.io.nifti import float32_tensor
from medseg.io.readers import read_channels, read_volume
from medseg.io.volume import Volume
from medseg.plan.planner import Plan
from medseg.transforms.clahe import CLAHEd
from medseg.transforms.identity import IMAGE, LABEL, config_identity, preprocessing_hash, preprocessing_identity
from medseg.transforms.intensity import normalization

__all__ = ["IMAGE", "LABEL", "config_identity", "preprocessing_hash", "preprocessing_identity"]  # defined in identity



class Pipeline(Compose):
    """MONAI ``Compose`` that lets medseg's coded errors through: MONAI re-raises anything a transform raises as
    ``RuntimeError("applying transform ...")`` (and logs the data's statistics); a :class:`MedsegError` or an
    allocation failure raised inside comes out as itself, so a caller sees the input's code, not a wrapper."""

    def __init__(self, transforms: list) -> None:
        super().__init__(transforms, log_stats=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from medseg.errors import MedsegError, unwrap

        try:
            return super().__call__(*args, **kwargs)
        except RuntimeError as exc:
            inner = unwrap(exc)
            if isinstance(inner, (MedsegError, MemoryError)):
                raise inner from None
            raise


def volume_to_metatensor(volume: Volume) -> MetaTensor:
    """Converts a :class:`Volume` to a float32 MONAI ``MetaTensor`` ``(C, *spatial)`` carrying its affine."""
    data = float32_tensor(volume.array)
    spatial = len(volume.spatial_shape)
    affine = volume.affine if spatial == 3 else volume.affine[np.ix_([0, 1, 3], [0, 1, 3])]
    return MetaTensor(data, affine=torch.as_tensor(affine, dtype=torch.float64))


class LoadVolumed(MapTransform):
    """Reads the files named under ``keys`` (a path, or a list of channel paths) into MetaTensors."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            volume = read_channels(value) if isinstance(value, (list, tuple)) else read_volume(value)
            d[key] = volume_to_metatensor(volume)
        return d


def resampled_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, ...]:
    """The grid size of ``shape`` at ``spacing`` resampled to ``target`` spacing (each axis covers the same extent)."""
    return tuple(max(1, math.ceil(n * s / t - 1e-6)) for n, s, t in zip(shape, spacing, target))


class GridCapd(MapTransform):
    """Refuses, before resampling, an image whose grid at the model's spacing would not fit in memory (a header
    with 1000 mm voxels resampled to 1 mm: 10^9 times the voxels), naming both spacings.

    Raises:
        InputError: ``MODEL_GRID_TOO_LARGE``.
    """

    def __init__(self, keys, spacing: tuple[float, ...]) -> None:
        super().__init__(keys)
        self.spacing = tuple(float(s) for s in spacing)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from medseg.transforms.resample import check_model_grid

        d = dict(data)
        image = d[IMAGE]
        dims = len(self.spacing)
        affine = np.asarray(image.affine, dtype=np.float64)
        current = tuple(float(v) for v in np.linalg.norm(affine[:dims, :dims], axis=0))
        shape = resampled_shape(tuple(int(n) for n in image.shape[1:]), current, self.spacing)
        check_model_grid(shape, int(image.shape[0]), current, self.spacing, images=len(self.keys))
        return d


def _preprocess(cfg: Config, plan: Plan, keys: tuple[str, ...]) -> list:
    spacing = cfg.data.spacing or tuple(plan.spacing)
    modes = ("bilinear", "nearest") if LABEL in keys else ("bilinear",)
    steps: list = [
        Orientationd(keys=keys, axcodes="RAS"[: len(spacing)], labels=None),
        GridCapd(keys, spacing),
        Spacingd(keys=keys, pixdim=spacing, mode=modes),
    ]
    clahe = cfg.data.clahe
    if clahe.enabled:
        steps.append(CLAHEd(IMAGE, kernel_size=clahe.kernel_size, clip_limit=clahe.clip_limit, nbins=clahe.nbins))
    steps.append(normalization(cfg.data.intensity, plan.normalization, plan.intensity))
    return steps


def build_infer_transforms(cfg: Config, plan: Plan) -> Compose:
    """Preprocessing of an image MetaTensor already in memory (key ``image``)."""
    return Pipeline(_preprocess(cfg, plan, (IMAGE,)))


def build_preprocess_transforms(cfg: Config, plan: Plan) -> Compose:
    """Deterministic part for training and validation: reads image and label files and preprocesses both."""
    keys = (IMAGE, LABEL)
    return Pipeline([LoadVolumed(keys=keys), *_preprocess(cfg, plan, keys)])


class RandRotateZoomd(RandomizableTransform, MapTransform):
    """In-plane rotation and isotropic zoom, each with its own probability, applied as one resampling.

    Rotation (probability ``rotate_prob``) is uniform in ``[-rotate_rad, rotate_rad]`` about the last axis in 3D;
    zoom (probability ``scale_prob``) is one factor for every axis, uniform in ``1 +- scale_range``. The two are
    drawn independently; when either is drawn, image and label are resampled once through the combined affine
    (MONAI ``Affine``: ``modes`` per key, e.g. bilinear for the image, nearest for the label).
    """

    def __init__(self, keys, rotate_prob: float, rotate_rad: float, scale_prob: float, scale_range: float, dims: int,
                 modes: tuple[str, ...], padding_mode: str = "border") -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.rotate_prob, self.rotate_rad = rotate_prob, rotate_rad
        self.scale_prob, self.scale_range = scale_prob, scale_range
        self.dims, self.modes, self.padding_mode = dims, modes, padding_mode
        self.angle, self.factor = 0.0, 1.0

    def randomize(self, data: Any = None) -> None:
        rotate = self.R.rand() < self.rotate_prob
        zoom = self.R.rand() < self.scale_prob
        self.angle = float(self.R.uniform(-self.rotate_rad, self.rotate_rad)) if rotate else 0.0
        self.factor = float(self.R.uniform(1 - self.scale_range, 1 + self.scale_range)) if zoom else 1.0
        self._do_transform = rotate or zoom

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        affine = Affine(
            rotate_params=(self.angle,) if self.dims == 2 else (0.0, 0.0, self.angle),
            scale_params=(self.factor,) * self.dims,
            padding_mode=self.padding_mode,
            image_only=True,
        )
        for key, mode in zip(self.key_iterator(d), self.modes):
            d[key] = affine(d[key], mode=mode)
        return d


def build_augment_transforms(cfg: Config) -> Compose:
    """Random part, applied to preprocessed cases every time they are drawn: pad, crop, augment.

    Spatial: flips per axis; in-plane rotation and isotropic zoom, each with its own probability
    (:class:`RandRotateZoomd`, one resampling); elastic deformation
    (3D: ``Rand3DElasticd`` with ``elastic_sigma``/``elastic_magnitude``; 2D: ``Rand2DElasticd`` with control
    points every 3 x sigma voxels moved by magnitude / 50 of that spacing). Intensity: scale, shift, gamma,
    Gaussian noise, Gaussian blur, low-resolution simulation, per-channel colour scaling.
    """
    keys = (IMAGE, LABEL)
    aug = cfg.augment
    patch = list(cfg.data.patch_size or ())
    dims = len(patch)
    spatial_modes = ("bilinear", "nearest")
    steps: list = [
        SpatialPadd(keys=keys, spatial_size=patch),
        RandCropByPosNegLabeld(keys=keys, label_key=LABEL, spatial_size=patch, pos=aug.pos_neg_ratio, neg=1.0, num_samples=1),
    ]
    steps += [RandFlipd(keys=keys, prob=aug.flip_prob, spatial_axis=axis) for axis in range(dims)]
    angle = math.radians(aug.rotate_deg)
    if aug.rotate_prob or aug.scale_prob:
        steps.append(RandRotateZoomd(keys, aug.rotate_prob, angle, aug.scale_prob, aug.scale_range, dims, spatial_modes))
    if aug.elastic_prob:
        if dims == 3:
            steps.append(Rand3DElasticd(keys=keys, sigma_range=aug.elastic_sigma, magnitude_range=aug.elastic_magnitude,
                                        prob=aug.elastic_prob, mode=spatial_modes, padding_mode="border"))
        else:
            spacing = (3 * aug.elastic_sigma[1],) * 2
            magnitude = (aug.elastic_magnitude[0] / 50, aug.elastic_magnitude[1] / 50)
            steps.append(Rand2DElasticd(keys=keys, spacing=spacing, magnitude_range=magnitude, prob=aug.elastic_prob,
                                        mode=spatial_modes, padding_mode="border"))
    steps += [
        RandScaleIntensityd(keys=IMAGE, factors=aug.intensity_scale, prob=aug.intensity_prob),
        RandShiftIntensityd(keys=IMAGE, offsets=aug.intensity_shift, prob=aug.intensity_prob),
    ]
    if aug.colour_prob:
        steps.append(RandScaleIntensityd(keys=IMAGE, factors=aug.colour_scale, prob=aug.colour_prob, channel_wise=True))
    if aug.gamma_prob:
        steps.append(RandAdjustContrastd(keys=IMAGE, prob=aug.gamma_prob, gamma=aug.gamma_range))
    if aug.noise_prob:
        steps.append(RandGaussianNoised(keys=IMAGE, prob=aug.noise_prob, std=aug.noise_std))
    if aug.blur_prob:
        sigma = aug.blur_sigma  # (low, high) drawn per axis; sigma_z only matters in 3D
        steps.append(RandGaussianSmoothd(keys=IMAGE, prob=aug.blur_prob, sigma_x=sigma, sigma_y=sigma,
                                         sigma_z=sigma if dims == 3 else (0.25, 1.5)))
    if aug.lowres_prob:
        steps.append(RandSimulateLowResolutiond(keys=IMAGE, prob=aug.lowres_prob, zoom_range=aug.lowres_zoom,
                                                upsample_mode="trilinear" if dims == 3 else "bilinear"))
    return Pipeline(steps)
