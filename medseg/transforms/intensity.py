"""Intensity normalisation chosen by ``data.intensity.scheme`` (see :class:`medseg.config.IntensityConfig`)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

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
    if scheme == "ct":
        # clip_low/clip_high: plan.ct_clip_percentiles of the foreground; p00_5/p99_5 in plans written before
        low = stats["clip_low"] if "clip_low" in stats else stats["p00_5"]
        high = stats["clip_high"] if "clip_high" in stats else stats["p99_5"]
        return ClipZScored(key, low, high, stats["mean"], stats["std"])
    if scheme == "window":
        if cfg.window is None:
            raise ConfigError("CONFIG_INVALID_VALUE", "data.intensity.window is required for scheme window", "e.g. [-160, 240]")
        low, high = cfg.window
        return ScaleIntensityRanged(key, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    if scheme == "zscore":
        return NormalizeIntensityd(key, nonzero=True, channel_wise=True)
    if scheme == "percentile":
        low, high = cfg.percentiles
        return ScaleIntensityRangePercentilesd(key, lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True, channel_wise=True)
    if scheme == "rgb":
        return ScaleIntensityRanged(key, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True)
    raise ConfigError("CONFIG_INVALID_VALUE", f"unknown normalisation scheme {scheme!r}")
