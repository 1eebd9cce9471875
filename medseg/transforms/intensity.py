"""Intensity normalisation chosen by ``data.intensity.scheme`` (see :class:`medseg.config.IntensityConfig`)."""

from __future__ import annotations

from typing import Any, Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, NormalizeIntensityd, ScaleIntensityRanged, ScaleIntensityRangePercentilesd

from medseg.config import IntensityConfig
from medseg.errors import ConfigError


class ClipZScored(MapTransform):
    """Clips to ``[low, high]`` then z-scores with a fixed ``mean``/``std`` (dataset statistics, CT)."""

    def __init__(self, keys: KeysCollection, low: float, high: float, mean: float, std: float) -> None:
        super().__init__(keys)
        self.low, self.high, self.mean, self.std = low, high, mean, max(std, 1e-8)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (torch.clamp(d[key], self.low, self.high) - self.mean) / self.std
        return d


def normalization(cfg: IntensityConfig, stats: dict[str, float], key: str = "image") -> MapTransform:
    """The normalisation transform for ``cfg.scheme``; ``stats`` are the fingerprint's foreground statistics.

    Raises:
        ConfigError: ``CONFIG_INVALID_VALUE`` when ``window`` is missing for the window scheme or no scheme is set.
    """
    if cfg.scheme == "ct":
        return ClipZScored(key, stats["p00_5"], stats["p99_5"], stats["mean"], stats["std"])
    if cfg.scheme == "window":
        if cfg.window is None:
            raise ConfigError("CONFIG_INVALID_VALUE", "data.intensity.window is required for scheme window", "e.g. [-160, 240]")
        low, high = cfg.window
        return ScaleIntensityRanged(key, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    if cfg.scheme == "zscore":
        return NormalizeIntensityd(key, nonzero=True, channel_wise=True)
    if cfg.scheme == "percentile":
        low, high = cfg.percentiles
        return ScaleIntensityRangePercentilesd(key, lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True, channel_wise=True)
    if cfg.scheme == "rgb":
        return ScaleIntensityRanged(key, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True)
    raise ConfigError("CONFIG_INVALID_VALUE", "data.intensity.scheme is not set and no plan chose one")
