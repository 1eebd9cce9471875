"""nnU-Net-style UNet (thin over MONAI's DynUNet): plain or residual conv blocks, optional deep supervision."""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.models.registry import NetworkSpec, network


class DeepSupervisedUNet(nn.Module):
    """Returns ``(B, K, *spatial)``; with deep supervision, in training mode, the list of decoder outputs
    (coarsest first, final last), each upsampled to full resolution."""

    def __init__(self, net: DynUNet, deep_supervision: bool) -> None:
        super().__init__()
        self.net, self.deep_supervision = net, deep_supervision

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.net(x)
        if self.deep_supervision and self.training:
            return list(torch.unbind(out, dim=1))[::-1]  # DynUNet stacks (final, deeper...) on dim 1
        return out


@network("dynunet", NetworkSpec(dims=(2, 3), deep_supervision=True, memory_factor=4.05, min_deepest=2,
                                     reads=("channels", "strides", "num_res_units", "deep_supervision")))
def dynunet(cfg: ModelConfig, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """DynUNet with ``len(cfg.channels)`` levels, kernel 3, the given strides; residual blocks when
    ``num_res_units > 0``; deep supervision on all but the two coarsest decoder levels."""
    channels, strides = tuple(cfg.channels or ()), tuple(cfg.strides or ())
    if len(strides) != len(channels) - 1:
        raise ConfigError("CONFIG_INVALID_VALUE", f"model.strides needs {len(channels) - 1} entries for {len(channels)} channels")
    levels = len(channels)
    net = DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[3] * levels,
        strides=[1, *strides],
        upsample_kernel_size=list(strides),
        filters=list(channels),
        dropout=cfg.dropout or None,
        res_block=cfg.num_res_units > 0,
        deep_supervision=cfg.deep_supervision,
        deep_supr_num=max(1, levels - 2),
    )
    return DeepSupervisedUNet(net, cfg.deep_supervision)
