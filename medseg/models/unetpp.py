"""UNet++ (thin over MONAI's BasicUNetPlusPlus): nested dense skip pathways, fixed depth of 4 downsamplings."""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNetPlusPlus
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.models.registry import NetworkSpec, network


class UNetPlusPlus(nn.Module):
    """Returns the final output ``(B, K, *spatial)``; with deep supervision, in training mode, the list of the
    nested decoders' outputs (coarsest first, final last), each at full resolution."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: tuple[int, ...],
                 dropout: float, deep_supervision: bool) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        self.net = BasicUNetPlusPlus(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            features=(*channels, channels[0]),
            dropout=dropout,
            deep_supervision=deep_supervision,
        )
        if not deep_supervision:  # MONAI builds the three intermediate heads anyway; unused weights break DDP
            for head in ("final_conv_0_1", "final_conv_0_2", "final_conv_0_3"):
                setattr(self.net, head, nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        outputs = self.net(x)  # list: [final] or [x_0_1, x_0_2, x_0_3, x_0_4]
        if self.deep_supervision and self.training:
            return list(outputs)
        return outputs[-1]


@network("unetpp", NetworkSpec(dims=(2, 3), deep_supervision=True, fixed_levels=4, memory_factor=7.24,
                                   min_deepest=2, reads=("channels", "strides", "dropout", "deep_supervision")))
def unetpp(cfg: ModelConfig, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """UNet++ with 5 levels: ``model.channels`` has 5 entries and ``model.strides`` is ``[2, 2, 2, 2]``."""
    channels = tuple(cfg.channels or ())
    if len(channels) != 5 or tuple(cfg.strides or ()) != (2, 2, 2, 2):
        raise ConfigError(
            "CONFIG_INVALID_VALUE",
            f"unetpp needs 5 model.channels and model.strides [2, 2, 2, 2], found {list(channels)} / {list(cfg.strides or ())}",
            "leave both null to take them from the plan",
        )
    return UNetPlusPlus(spatial_dims, in_channels, out_channels, channels, cfg.dropout, cfg.deep_supervision)
