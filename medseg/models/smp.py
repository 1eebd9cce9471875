"""2D encoder-decoder networks of segmentation_models_pytorch (Iakubovskii, "Segmentation Models Pytorch",
GitHub 2019): ``Unet``, ``UnetPlusPlus``, ``DeepLabV3Plus`` and ``FPN`` over any of its encoders (ResNet,
EfficientNet, MobileNet, ... and timm's through ``tu-<name>``), the usual choice for dermoscopy, endoscopy and X-ray
work. Built with ``encoder_weights=None`` - nothing is downloaded; ImageNet weights a user has as a local file go in
through ``model.pretrained`` (an encoder-only checkpoint loads into ``encoder.``).

Config keys read: ``model.arch`` (``Unet`` (null), ``UnetPlusPlus``, ``DeepLabV3Plus``, ``FPN``), ``model.encoder``
(an smp encoder name, ``resnet34`` when null), ``model.strides`` (``encoder_depth`` = its length, 3 to 5, every entry
2; null takes five from the plan, so patches are multiples of 32), ``model.dropout`` (FPN's decoder dropout; 0 for the
others). ``model.channels`` is not read: the encoder sets the widths. No deep supervision. 2D only.

Needs ``segmentation-models-pytorch`` and ``torchvision`` (``pip install medseg[networks]``); BatchNorm encoders train
with batches of at least 2 (``min_batch``), which the plan always gives.
"""

from __future__ import annotations

from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ConfigError, describe
from medseg.models.registry import NetworkSpec, network, require_package

ARCHS = ("Unet", "UnetPlusPlus", "DeepLabV3Plus", "FPN")
DEFAULT_ENCODER = "resnet34"


@network("smp", NetworkSpec(dims=(2,), fixed_levels=5, min_batch=2, memory_factor=3.04,
                             requires=("segmentation_models_pytorch", "torchvision"), install="segmentation-models-pytorch",
                             reads=("arch", "encoder", "strides", "dropout")))
def smp_network(cfg: ModelConfig, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """``segmentation_models_pytorch.<model.arch>`` over ``model.encoder``, randomly initialised."""
    arch = cfg.arch or "Unet"
    if arch not in ARCHS:
        raise ConfigError("CONFIG_INVALID_VALUE", f"smp has no architecture {arch!r}", f"use model.arch={' | '.join(ARCHS)}")
    strides = tuple(cfg.strides or (2,) * 5)
    if not 3 <= len(strides) <= 5 or any(s != 2 for s in strides):
        raise ConfigError("CONFIG_INVALID_VALUE", f"smp needs 3 to 5 model.strides, each 2 (found {list(strides)})",
                          "its encoder halves the image per stage; leave channels and strides null to take five from the plan")
    smp = require_package("segmentation_models_pytorch", "smp networks", "segmentation-models-pytorch")
    depth = len(strides)
    kwargs: dict = {"encoder_name": cfg.encoder or DEFAULT_ENCODER, "encoder_weights": None, "encoder_depth": depth,
                    "in_channels": in_channels, "classes": out_channels}
    if arch in ("Unet", "UnetPlusPlus"):
        kwargs["decoder_channels"] = (256, 128, 64, 32, 16)[5 - depth:]
    if arch == "FPN":
        kwargs["decoder_dropout"] = cfg.dropout
    elif cfg.dropout:
        raise ConfigError("CONFIG_INVALID_VALUE", f"smp {arch} has no dropout", "set model.dropout=0 (FPN has decoder dropout)")
    if arch == "DeepLabV3Plus" and depth < 4:
        raise ConfigError("CONFIG_INVALID_VALUE", "smp DeepLabV3Plus needs 4 or 5 model.strides")
    try:
        return getattr(smp, arch)(**kwargs)
    except (KeyError, ValueError, RuntimeError) as exc:  # smp (or timm) names the encoders it knows in its message
        raise ConfigError("CONFIG_INVALID_VALUE", f"smp cannot build {arch} with encoder {kwargs['encoder_name']!r}: {describe(exc, limit=400)}",
                          "see segmentation_models_pytorch's encoder list (timm encoders as tu-<name>)") from None
