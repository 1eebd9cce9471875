"""Voxel-wise intensity normalisations with fixed parameters — CT clip + z-score with the dataset's statistics, a
fixed window, RGB scaling — as plain torch functions, without MONAI.

They are *the* definition: training's dictionary transforms (:func:`medseg.transforms.intensity.normalization`)
wrap these functions, and prediction applies them to slabs of the stored image (:mod:`medseg.inference.predictor`),
so what the network was trained on is what it is fed, and a prediction with an exported model never imports MONAI.
``scale_range`` is MONAI's ``ScaleIntensityRange(a_min, a_max, b_min=0, b_max=1, clip=True)`` without its
multiplication by 1 and addition of 0 (``tests/transforms/test_pointwise.py`` checks it equal to MONAI's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch

from medseg.config import IntensityConfig
from medseg.errors import ConfigError

POINTWISE = ("ct", "window", "rgb")  # the schemes that act voxel by voxel with fixed parameters
Normalizer = Callable[[torch.Tensor], torch.Tensor]


def scale_range(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``[low, high]`` to ``[0, 1]``, clipped; float32 out (MONAI's ``ScaleIntensityRange`` with ``clip=True``)."""
    if high - low == 0.0:
        return (image - low).to(torch.float32)
    return torch.clamp((image - low) / (high - low), 0.0, 1.0).to(torch.float32)


def clip_zscore(image: torch.Tensor, low: float, high: float, mean: float, std: float) -> torch.Tensor:
    """Clips to ``[low, high]`` then z-scores with a fixed ``mean`` and ``std`` (dataset statistics, CT)."""
    return (torch.clamp(image, low, high) - mean) / max(std, 1e-8)


def channel_normalizer(cfg: IntensityConfig, scheme: str, stats: dict[str, float]) -> Normalizer:
    """The function of one pointwise ``scheme`` (``ct`` needs the fingerprint's foreground ``stats``).

    Raises:
        ConfigError: ``CONFIG_INVALID_VALUE`` when ``window`` is missing for the window scheme.
    """
    if scheme == "ct":
        # clip_low/clip_high: plan.ct_clip_percentiles of the foreground; p00_5/p99_5 in plans written before
        low = stats["clip_low"] if "clip_low" in stats else stats["p00_5"]
        high = stats["clip_high"] if "clip_high" in stats else stats["p99_5"]
        return partial(clip_zscore, low=low, high=high, mean=stats["mean"], std=stats["std"])
    if scheme == "window":
        if cfg.window is None:
            raise ConfigError("CONFIG_INVALID_VALUE", "data.intensity.window is required for scheme window", "e.g. [-160, 240]")
        return partial(scale_range, low=cfg.window[0], high=cfg.window[1])
    if scheme == "rgb":
        return partial(scale_range, low=0.0, high=255.0)
    raise ConfigError("CONFIG_INVALID_VALUE", f"{scheme!r} is not a voxel-wise normalisation ({', '.join(POINTWISE)})")


def schemes_of(cfg: IntensityConfig, planned: Sequence[str], channels: int) -> list[str]:
    """The scheme of each channel: ``cfg.scheme`` for all when set, else the plan's."""
    return [cfg.scheme] * channels if cfg.scheme else list(planned)


def pointwise_normalizer(cfg: IntensityConfig, planned: Sequence[str], stats: Sequence[dict[str, float]],
                         channels: int) -> Normalizer | None:
    """The normalisation of ``(C, ...)`` images as one function when every channel's scheme is pointwise, else
    ``None``. Channels follow :func:`medseg.transforms.intensity.normalization`: a configured ``cfg.scheme`` applies
    to every channel with the first channel's statistics, the plan's schemes with each channel's own."""
    schemes = schemes_of(cfg, planned, channels)
    if not all(s in POINTWISE for s in schemes):
        return None
    if cfg.scheme is not None or (len(set(schemes)) == 1 and schemes[0] != "ct"):
        return channel_normalizer(cfg, schemes[0], stats[0] if stats else {})
    functions = [channel_normalizer(cfg, s, stat) for s, stat in zip(schemes, stats)]

    def per_channel(image: torch.Tensor) -> torch.Tensor:
        return torch.cat([f(image[c : c + 1]) for c, f in enumerate(functions)], dim=0)

    return per_channel
