"""DeepLabV3 (Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation", 2017) as torchvision
builds it: a dilated ResNet-50/101 (output stride 8) or MobileNetV3-Large backbone, atrous spatial pyramid pooling,
and logits upsampled bilinearly to the input size. Built with ``weights=None, weights_backbone=None``: nothing is
downloaded (a local checkpoint goes in through ``model.pretrained``). 2D only.

Config keys read: ``model.encoder`` (``resnet50`` (null), ``resnet101``, ``mobilenet_v3_large``). A first
convolution for ``in_channels`` other than 3 replaces the backbone's (grey X-ray, multi-channel inputs).
Every BatchNorm uses PyTorch's momentum 0.1 (MobileNetV3 comes with
0.01, whose running statistics lag far behind after a short run). ``model.channels`` and ``model.strides`` are not read (the plan's four levels keep patches multiples of 16, the
backbone's coarsest stride). No auxiliary head, no deep supervision, no dropout beyond torchvision's own.

Needs ``torchvision`` (``pip install medseg[networks]``); BatchNorm trains with batches of at least 2 (``min_batch``;
the pooled ASPP branch has one value per channel and sample).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.models.registry import NetworkSpec, network, require_package

BACKBONES = ("resnet50", "resnet101", "mobilenet_v3_large")


class DeepLabV3(nn.Module):
    """torchvision's ``DeepLabV3`` returning medseg's ``(B, K, H, W)`` logits (its ``out`` entry)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


def _first_conv(backbone: Any) -> tuple[Any, str]:  # a torchvision backbone
    """The backbone's first convolution and the attribute path it sits at."""
    if hasattr(backbone, "conv1"):
        return backbone.conv1, "conv1"
    return backbone["0"][0], "0.0"  # MobileNetV3: features[0] is Conv2dNormActivation


@network("deeplabv3", NetworkSpec(dims=(2,), fixed_levels=4, min_batch=2, memory_factor=2.44, requires=("torchvision",),
                                   install="torchvision", reads=("encoder",)))
def deeplabv3(cfg: ModelConfig, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """torchvision ``deeplabv3_<model.encoder>`` with ``num_classes`` outputs, randomly initialised."""
    backbone = cfg.encoder or "resnet50"
    if backbone not in BACKBONES:
        raise ConfigError("CONFIG_INVALID_VALUE", f"deeplabv3 has no backbone {backbone!r}", f"use model.encoder={' | '.join(BACKBONES)}")
    if cfg.dropout:
        raise ConfigError("CONFIG_INVALID_VALUE", "deeplabv3 has no model.dropout setting", "set model.dropout=0")
    segmentation = require_package("torchvision.models.segmentation", "deeplabv3", "torchvision")
    net = getattr(segmentation, f"deeplabv3_{backbone}")(weights=None, weights_backbone=None, num_classes=out_channels,
                                                         aux_loss=False)
    if in_channels != 3:
        conv, where = _first_conv(net.backbone)
        new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
        if where == "conv1":
            net.backbone.conv1 = new
        else:
            net.backbone["0"][0] = new
    for module in net.modules():  # MobileNetV3's TF-style momentum 0.01 leaves the running statistics far from the
        if isinstance(module, nn.BatchNorm2d):  # batch statistics after the few thousand steps of a medseg run:
            module.momentum = 0.1  # measured, all-background predictions in eval mode; PyTorch's default 0.1 instead
    return DeepLabV3(net)
