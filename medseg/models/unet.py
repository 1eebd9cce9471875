"""UNet (thin over MONAI's residual UNet)."""

from __future__ import annotations

from monai.networks.nets import UNet
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.models.registry import NetworkSpec, network


@network("unet", NetworkSpec(dims=(2, 3), min_deepest=2, reads=("channels", "strides", "num_res_units", "dropout")))
def unet(cfg: ModelConfig, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """MONAI ``UNet`` with ``len(cfg.channels)`` levels; ``cfg.strides`` has one entry fewer."""
    if cfg.channels is None or cfg.strides is None:
        raise ConfigError("CONFIG_INVALID_VALUE", "model.channels and model.strides are null (left to the plan)",
                          "build the network from a planned config (medseg plan / train), or set both")
    if len(cfg.strides) != len(cfg.channels) - 1:
        raise ConfigError(
            "CONFIG_INVALID_VALUE",
            f"model.strides needs {len(cfg.channels) - 1} entries for {len(cfg.channels)} channels, found {len(cfg.strides)}",
        )
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=cfg.channels,
        strides=cfg.strides,
        num_res_units=cfg.num_res_units,
        dropout=cfg.dropout,
    )
