"""SwinUNETR (thin over MONAI's ``SwinUNETR``; Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic
Segmentation of Brain Tumors in MRI Images", BrainLes 2021): a Swin transformer encoder with a convolutional
decoder. 2D and 3D. Its encoder halves every axis five times (patch embedding 2, then four stages), so the
planner keeps patch sizes divisible by 32 (``fixed_levels = 5``).

Config keys read: ``model.channels`` (its first entry, rounded up to a multiple of 12 because the first stage
has 3 heads of equal width, is the ``feature_size``; MONAI's default is 24), ``model.strides`` (must be five 2s
when given; null takes them from the plan), ``model.dropout`` (the transformer's ``drop_rate``). The attention
window is 7 voxels, MONAI's default. No deep supervision. Not exportable to ONNX/TorchScript (``EXPORT_UNSUPPORTED``:
the traced window partition holds for one input shape only; measured: ONNX Runtime's Reshape fails on a second
size); it predicts through the PyTorch backend.
"""

from __future__ import annotations

from monai.networks.nets import SwinUNETR
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.models.registry import NetworkSpec, network

LEVELS = 5


@network("swinunetr", NetworkSpec(
    dims=(2, 3), fixed_levels=LEVELS, memory_factor=9.91, min_deepest=2, reads=("channels", "strides", "dropout"),
    not_exportable="its window partition is traced for one input shape (ONNX and TorchScript fail on others)"))
def swinunetr(cfg: ModelConfig, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """MONAI ``SwinUNETR`` with ``feature_size`` from ``cfg.channels[0]`` (a multiple of 12)."""
    channels, strides = tuple(cfg.channels or ()), tuple(cfg.strides or ())
    if strides != (2,) * LEVELS:
        raise ConfigError(
            "CONFIG_INVALID_VALUE", f"swinunetr needs model.strides [2, 2, 2, 2, 2], found {list(strides)}",
            "its encoder halves every axis five times; leave channels and strides null to take them from the plan",
        )
    feature_size = max(12, -(-int(channels[0]) // 12) * 12)
    return SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        feature_size=feature_size,
        drop_rate=cfg.dropout,
        spatial_dims=spatial_dims,
    )
