"""Intensity normalisation chosen by ``data.intensity.scheme`` (see :class:`medseg.config.IntensityConfig`), as MONAI
dictionary transforms. The voxel-wise schemes (``ct``, ``window``, ``rgb``) wrap the functions of
:mod:`medseg.transforms.pointwise`, which prediction applies directly."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, NormalizeIntensityd, ScaleIntensityRangePercentilesd

from medseg.config import IntensityConfig
from medseg.errors import ConfigError
from medseg.transforms.pointwise import POINTWISE, Normalizer, channel_normalizer


class Pointwised(MapTransform):
    """Applies a voxel-wise normalisation function (:mod:`medseg.transforms.pointwise`) to ``keys``."""

    def __init__(self, keys: KeysCollection, function: Normalizer) -> None:
        super().__init__(keys)
        self.function = function

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.function(d[key])
        return d


class PerChannel(MapTransform):
    """Applies one normalisation per channel of ``(C, *spatial)`` images (e.g. CT + PET, or several MR sequences)."""

    def __init__(self, key: str, transforms: list[MapTransform]) -> None:
        super().__init__(key)
        self.transforms = transforms

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            channels = [t({key: image[c : c + 1]})[key] for c, t in enumerate(self.transforms)]
            d[key] = torch.cat(channels, dim=0)
        return d


def normalization(cfg: IntensityConfig, schemes: list[str], stats: list[dict[str, float]], key: str = "image") -> MapTransform:
    """The normalisation transform: ``cfg.scheme`` for every channel when set, else the plan's ``schemes`` per
    channel. ``stats`` are the fingerprint's foreground statistics per channel.

    Raises:
        ConfigError: ``CONFIG_INVALID_VALUE`` when ``window`` is missing for the window scheme.
    """
    if cfg.scheme is not None:
        return _single(cfg, cfg.scheme, stats[0] if stats else {}, key)
    if len(set(schemes)) == 1 and schemes[0] != "ct":
        return _single(cfg, schemes[0], stats[0] if stats else {}, key)
    return PerChannel(key, [_single(cfg, scheme, stat, key) for scheme, stat in zip(schemes, stats)])


def _single(cfg: IntensityConfig, scheme: str, stats: dict[str, float], key: str) -> MapTransform:
    if scheme in POINTWISE:
        return Pointwised(key, channel_normalizer(cfg, scheme, stats))
    if scheme == "zscore":
        return NormalizeIntensityd(key, nonzero=True, channel_wise=True)
    if scheme == "percentile":
        low, high = cfg.percentiles
        return ScaleIntensityRangePercentilesd(key, lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True, channel_wise=True)
    raise ConfigError("CONFIG_INVALID_VALUE", f"unknown normalisation scheme {scheme!r}")
