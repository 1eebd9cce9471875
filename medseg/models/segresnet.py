"""SegResNet (thin over MONAI's ``SegResNet``; Myronenko, "3D MRI brain tumor segmentation using autoencoder
regularization", BrainLes 2018): a residual encoder with group norm and a light decoder, MONAI's strong
native baseline. 2D and 3D.

Config keys read: ``model.channels`` (its first entry is ``init_filters``; the number of entries is the number
of levels), ``model.strides`` (one fewer than channels, every entry 2: SegResNet halves every axis per level),
``model.dropout``. Encoder blocks per level are MONAI's (1, 2, 2, 4), then 4 for deeper levels; one decoder block
per level. No deep supervision.
"""

from __future__ import annotations

from monai.networks.nets import SegResNet
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.models.registry import NetworkSpec, network


@network("segresnet", NetworkSpec(dims=(2, 3), memory_factor=3.57, reads=("channels", "strides", "dropout")))
def segresnet(cfg: ModelConfig, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """MONAI ``SegResNet`` with ``len(cfg.channels)`` levels and ``cfg.channels[0]`` initial filters."""
    channels, strides = tuple(cfg.channels or ()), tuple(cfg.strides or ())
    if len(strides) != len(channels) - 1 or any(s != 2 for s in strides):
        raise ConfigError(
            "CONFIG_INVALID_VALUE",
            f"segresnet needs model.strides of {len(channels) - 1} entries, each 2 (found {list(strides)})",
            "SegResNet halves every axis per level; leave channels and strides null to take them from the plan",
        )
    levels = len(channels)
    init = int(channels[0])
    groups = next(g for g in (8, 4, 2, 1) if init % g == 0)
    return SegResNet(
        spatial_dims=spatial_dims,
        init_filters=init,
        in_channels=in_channels,
        out_channels=out_channels,
        dropout_prob=cfg.dropout or None,
        norm=("GROUP", {"num_groups": groups}),
        blocks_down=tuple(([1, 2, 2] + [4] * levels)[:levels]),
        blocks_up=(1,) * (levels - 1),
    )
