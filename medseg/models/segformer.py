"""SegFormer (Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers",
NeurIPS 2021), built by Hugging Face ``transformers`` as ``SegformerForSemanticSegmentation`` from a
``SegformerConfig`` - never ``from_pretrained``, so nothing is downloaded (ImageNet/ADE weights, where a user has
them as a local file, go through ``model.pretrained``). 2D only: a hierarchical Mix Transformer encoder (overlapping
patch embeddings, efficient self-attention) and an all-MLP decoder whose logits, at 1/4 of the input size, are
upsampled bilinearly to the input size.

Config keys read: ``model.size`` (``b0`` (null), ``b1``, ``b2``: the MiT-B0/B1/B2 widths and depths of the paper),
``model.strides`` (must be five 2s when given, as the encoder reduces by 32: the planner keeps 2D patches divisible
by 32), ``model.dropout`` (the classifier dropout; hidden and attention dropout stay 0). ``model.channels`` is not
read: the width is the size's. No deep supervision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.models.registry import NetworkSpec, network, require_package

LEVELS = 5
SIZES = {  # the paper's Table 6 (MiT-B0..B2), as in the configs of nvidia/mit-b0..b2
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
}


class SegFormer(nn.Module):
    """``SegformerForSemanticSegmentation`` with medseg's contract: ``(B, C, H, W)`` in, ``(B, K, H, W)`` logits out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(pixel_values=x, return_dict=False)[0]  # (B, K, H/4, W/4)
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)


@network("segformer", NetworkSpec(dims=(2,), fixed_levels=LEVELS, memory_factor=2.08, requires=("transformers",),
                                   install="transformers", reads=("strides", "size", "dropout"), sizes=tuple(SIZES)))
def segformer(cfg: ModelConfig, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """HF ``SegformerForSemanticSegmentation`` of size ``model.size`` (b0, b1, b2), randomly initialised."""
    strides = tuple(cfg.strides or ())
    if strides != (2,) * LEVELS:
        raise ConfigError("CONFIG_INVALID_VALUE", f"segformer needs model.strides [2, 2, 2, 2, 2], found {list(strides)}",
                          "its encoder reduces by 32; leave channels and strides null to take them from the plan")
    size = cfg.size or "b0"  # one of SIZES: NetworkSpec.sizes is checked before the build
    transformers = require_package("transformers", "segformer", "transformers")
    SegformerConfig, SegformerForSemanticSegmentation = transformers.SegformerConfig, transformers.SegformerForSemanticSegmentation

    config = SegformerConfig(
        num_channels=in_channels,
        num_labels=out_channels,
        num_attention_heads=[1, 2, 5, 8],
        sr_ratios=[8, 4, 2, 1],
        patch_sizes=[7, 3, 3, 3],
        strides=[4, 2, 2, 2],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=cfg.dropout,
        drop_path_rate=0.1,
        **SIZES[size],
    )
    return SegFormer(SegformerForSemanticSegmentation(config))
