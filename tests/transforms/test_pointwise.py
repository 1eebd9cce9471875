"""The voxel-wise normalisations that prediction applies without MONAI equal MONAI's transforms that training used
before they existed, and training's transforms are these functions."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRanged

from medseg.config import IntensityConfig
from medseg.errors import ConfigError
from medseg.transforms.intensity import normalization
from medseg.transforms.pointwise import clip_zscore, pointwise_normalizer, scale_range

STATS = [{"clip_low": -900.0, "clip_high": 1300.0, "mean": 40.0, "std": 210.0},
         {"p00_5": -50.0, "p99_5": 300.0, "mean": 80.0, "std": 35.0}]


def _cfg(scheme=None, window=None) -> IntensityConfig:
    return IntensityConfig(scheme=scheme, window=window, percentiles=(0.5, 99.5))


def _image(channels: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand((channels, 17, 13, 11), generator=g) * 4000 - 2000).float()


@pytest.mark.parametrize("low, high", [(-160.0, 240.0), (0.0, 255.0), (-1000.0, 3000.0), (7.0, 7.0)])
def test_scale_range_equals_monai(low, high):
    image = _image(2)
    ours = scale_range(image, low, high)
    if high == low:
        with pytest.warns(Warning, match="Divide by zero"):
            theirs = ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)({"image": image})["image"]
    else:
        theirs = ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)({"image": image})["image"]
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, torch.as_tensor(theirs))


def test_clip_zscore_against_its_formula():
    image = _image()
    out = clip_zscore(image, -900.0, 1300.0, 40.0, 210.0)
    expected = (image.clamp(-900.0, 1300.0) - 40.0) / 210.0
    assert torch.equal(out, expected)
    assert out.min() >= (-900 - 40) / 210 - 1e-6 and out.max() <= (1300 - 40) / 210 + 1e-6


@pytest.mark.parametrize("cfg, planned, channels", [
    (_cfg(scheme="window", window=[-160, 240]), ["ct"], 1),
    (_cfg(), ["ct"], 1),
    (_cfg(), ["ct", "ct"], 2),  # each channel its own statistics
    (_cfg(window=[-160, 240]), ["ct", "rgb"], 2),
    (_cfg(scheme="ct"), ["zscore", "zscore"], 2),  # a configured scheme: the first channel's statistics
    (_cfg(), ["rgb", "rgb"], 2),
])
def test_prediction_normalizer_is_training_transform(cfg, planned, channels):
    image = _image(channels)
    predict = pointwise_normalizer(cfg, planned, STATS[:channels], channels)
    assert predict is not None
    train = normalization(cfg, planned, STATS[:channels])({"image": MetaTensor(image.clone())})["image"]
    assert torch.equal(predict(image), train.as_tensor())


@pytest.mark.parametrize("cfg, planned", [(_cfg(), ["zscore"]), (_cfg(), ["ct", "percentile"]),
                                          (_cfg(scheme="zscore"), ["ct"])])
def test_image_wise_schemes_are_not_pointwise(cfg, planned):
    assert pointwise_normalizer(cfg, planned, STATS[: len(planned)], len(planned)) is None


def test_window_scheme_without_window_is_refused():
    with pytest.raises(ConfigError) as err:
        pointwise_normalizer(_cfg(scheme="window"), ["ct"], STATS[:1], 1)
    assert err.value.code == "CONFIG_INVALID_VALUE"
