"""Train / validation / inference transform pipelines (MONAI), built from the configuration.

Every pipeline starts with the same deterministic preprocessing: read through :mod:`medseg.io`, reorient
to RAS, resample to ``data.spacing`` (images linear, labels nearest) and normalise intensities. Training
adds foreground-oversampled random crops and augmentation; the inference pipeline is the preprocessing
alone, and :class:`medseg.inference.predictor.Predictor` maps predictions back to the input grid.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from medseg.config import Config
from medseg.io.nifti import read_nifti
from medseg.io.volume import Volume

IMAGE, LABEL = "image", "label"


def volume_to_metatensor(volume: Volume) -> MetaTensor:
    """Converts a :class:`Volume` to a float32 MONAI ``MetaTensor`` ``(C, X, Y, Z)`` carrying its affine."""
    data = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))
    spatial = len(volume.spatial_shape)
    affine = volume.affine if spatial == 3 else volume.affine[np.ix_([0, 1, 3], [0, 1, 3])]
    return MetaTensor(data, affine=torch.as_tensor(affine, dtype=torch.float64))


class LoadVolumed(MapTransform):
    """Reads the files named under ``keys`` with :func:`medseg.io.nifti.read_nifti` into MetaTensors."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = volume_to_metatensor(read_nifti(d[key]))
        return d


def _preprocess(cfg: Config, keys: tuple[str, ...]) -> list:
    has_label = LABEL in keys
    modes = ("bilinear", "nearest") if has_label else ("bilinear",)
    steps: list = [
        Orientationd(keys=keys, axcodes="RAS"[: len(cfg.data.spacing)], labels=None),
        Spacingd(keys=keys, pixdim=cfg.data.spacing, mode=modes),
    ]
    intensity = cfg.data.intensity
    if intensity.scheme == "ct_window":
        if intensity.window is None:
            from medseg.errors import ConfigError

            raise ConfigError("CONFIG_INVALID_VALUE", "data.intensity.window is required for scheme ct_window")
        low, high = intensity.window
        steps.append(ScaleIntensityRanged(keys=IMAGE, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    else:
        steps.append(NormalizeIntensityd(keys=IMAGE, nonzero=True, channel_wise=True))
    return steps


def build_infer_transforms(cfg: Config) -> Compose:
    """Preprocessing of an image MetaTensor already in memory (key ``image``)."""
    return Compose(_preprocess(cfg, (IMAGE,)))


def build_val_transforms(cfg: Config) -> Compose:
    """Reads image and label files and preprocesses both (keys ``image``, ``label``)."""
    keys = (IMAGE, LABEL)
    return Compose([LoadVolumed(keys=keys), *_preprocess(cfg, keys)])


def build_train_transforms(cfg: Config) -> Compose:
    """Validation preprocessing, then padded foreground-oversampled crops and augmentation."""
    keys = (IMAGE, LABEL)
    aug = cfg.augment
    patch = list(cfg.data.patch_size)
    steps = [
        LoadVolumed(keys=keys),
        *_preprocess(cfg, keys),
        SpatialPadd(keys=keys, spatial_size=patch),
        RandCropByPosNegLabeld(
            keys=keys, label_key=LABEL, spatial_size=patch, pos=aug.pos_neg_ratio, neg=1.0, num_samples=1
        ),
    ]
    steps += [RandFlipd(keys=keys, prob=aug.flip_prob, spatial_axis=axis) for axis in range(len(patch))]
    steps += [
        RandScaleIntensityd(keys=IMAGE, factors=aug.intensity_scale, prob=aug.intensity_prob),
        RandShiftIntensityd(keys=IMAGE, offsets=aug.intensity_shift, prob=aug.intensity_prob),
    ]
    return Compose(steps)
