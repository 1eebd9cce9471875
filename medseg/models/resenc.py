"""Residual-encoder UNet of nnU-Net ResEnc (Isensee et al., "nnU-Net Revisited: A Call for Rigorous Validation in
3D Medical Image Segmentation", MICCAI 2024), built by ``dynamic_network_architectures`` - nnU-Net's own network
package - as ``ResidualEncoderUNet``: residual basic blocks in the encoder, one conv per decoder stage, instance
norm, leaky ReLU, strided-conv downsampling, transposed-conv upsampling. 2D and 3D.

Config keys read: ``model.channels`` (features per stage; the number of entries is the number of stages),
``model.strides`` (one fewer than channels: the downsampling of stages 2..n; stage 1 keeps full resolution),
``model.deep_supervision`` (one output per decoder stage but the coarsest, upsampled to full resolution, coarsest
first), ``model.dropout`` (unused: nnU-Net's ResEnc has no dropout; a non-zero value is an error) and ``model.size``:

==========  =========================================  ==========================================================
size        residual blocks per encoder stage          what the planner does (GPU runs; CPU runs keep plan.cpu_*)
==========  =========================================  ==========================================================
``M``       1, 3, 4, 6, 6, 6, ... (nnU-Net's ResEnc)   8 GB GPU budget, features 32 .. 320 (2D: 512), as ResEnc M
``L``       1, 3, 4, 6, 6, 6, ...                      24 GB GPU budget, features 32 .. 320 (2D: 512), as ResEnc L
``cpu``     1, 2, 2, 2, ...                            the configured plan budgets and widths (null = ``cpu``)
==========  =========================================  ==========================================================

nnU-Net's ResEnc M and L are the same network family planned for a different GPU memory target (its
``nnUNetPlannerResEncM`` / ``ResEncL``); medseg does the same through :func:`plan_hints`. The package is installed
without its ``timm`` dependency (``make install``): timm serves only its Primus/EVA transformers, never imported here,
and requires torchvision, whose PyPI wheel does not load beside the CPU build of torch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.models.registry import NetworkSpec, network, require_package

SIZES = ("M", "L", "cpu")
NNUNET_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6)
CPU_BLOCKS = (1, 2, 2, 2, 2, 2, 2, 2, 2, 2)
GPU_BUDGET_GB = {"M": 8.0, "L": 24.0}


def _size(cfg: ModelConfig) -> str:
    return cfg.size or "cpu"  # one of SIZES: NetworkSpec.sizes is checked before the build


class ResEncUNet(nn.Module):
    """``ResidualEncoderUNet`` returning medseg's contract: ``(B, K, *spatial)`` logits, or in training with deep
    supervision the list of decoder outputs, coarsest first and final last, each upsampled to the input size."""

    def __init__(self, net: Any, deep_supervision: bool) -> None:  # dynamic_network_architectures' ResidualEncoderUNet
        super().__init__()
        self.net, self.deep_supervision = net, deep_supervision
        if not deep_supervision:  # only the final head runs: drop the others (unused parameters break DDP)
            heads = net.decoder.seg_layers
            for i in range(len(heads) - 1):
                heads[i] = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if not self.deep_supervision:
            return self.net(x)
        self.net.decoder.deep_supervision = self.training  # in eval only the final output is computed
        out = self.net(x)
        if not self.training:
            return out
        mode = "trilinear" if x.ndim == 5 else "bilinear"
        return [o if o.shape[2:] == x.shape[2:] else F.interpolate(o, size=x.shape[2:], mode=mode, align_corners=False)
                for o in out[::-1]]


@network("resenc_unet", NetworkSpec(
    dims=(2, 3), deep_supervision=True, memory_factor=4.3, min_deepest=2, requires=("dynamic_network_architectures",),
    install="dynamic-network-architectures", reads=("channels", "strides", "deep_supervision", "size"), sizes=SIZES,
    plan_hints=lambda cfg, dims: plan_hints(cfg, dims)))
def resenc_unet(cfg: ModelConfig, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """nnU-Net's ``ResidualEncoderUNet`` with ``len(cfg.channels)`` stages; blocks per stage by ``model.size``."""
    ResidualEncoderUNet = require_package("dynamic_network_architectures.architectures.unet", "resenc_unet",
                                          "dynamic-network-architectures").ResidualEncoderUNet
    channels, strides = tuple(cfg.channels or ()), tuple(cfg.strides or ())
    if len(strides) != len(channels) - 1:
        raise ConfigError("CONFIG_INVALID_VALUE", f"model.strides needs {len(channels) - 1} entries for {len(channels)} channels")
    if cfg.dropout:
        raise ConfigError("CONFIG_INVALID_VALUE", "resenc_unet has no dropout (nnU-Net's ResEnc uses none)",
                          "set model.dropout=0")
    blocks = NNUNET_BLOCKS if _size(cfg) in GPU_BUDGET_GB else CPU_BLOCKS
    stages = len(channels)
    if stages > len(blocks):
        raise ConfigError("CONFIG_INVALID_VALUE", f"resenc_unet supports at most {len(blocks)} stages, found {stages}")
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
    net = ResidualEncoderUNet(
        input_channels=in_channels,
        n_stages=stages,
        features_per_stage=list(channels),
        conv_op=conv,
        kernel_sizes=[3] * stages,
        strides=[1, *strides],
        n_blocks_per_stage=list(blocks[:stages]),
        num_classes=out_channels,
        n_conv_per_stage_decoder=[1] * (stages - 1),
        conv_bias=True,
        norm_op=norm,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=cfg.deep_supervision,
    )
    return ResEncUNet(net, cfg.deep_supervision)


def plan_hints(cfg: ModelConfig, spatial_dims: int) -> dict:
    """What the planner changes for this network: sizes M and L take nnU-Net's GPU memory target and widths."""
    size = _size(cfg)
    if size not in GPU_BUDGET_GB:
        return {}
    return {"gpu_memory_gb": GPU_BUDGET_GB[size], "base_channels": 32, "max_channels": 320 if spatial_dims == 3 else 512}
