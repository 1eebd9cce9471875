"""Loss registry. All losses take logits ``(B, K, *spatial)`` and integer labels ``(B, 1, *spatial)``,
and apply softmax over the K classes."""

from __future__ import annotations

from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss, FocalLoss
from torch import nn

from medseg.config import LossConfig
from medseg.registry import Registry

LOSSES: Registry = Registry("loss", "loss.name")


@LOSSES.register("dice")
def _dice(cfg: LossConfig) -> nn.Module:
    return DiceLoss(to_onehot_y=True, softmax=True)


@LOSSES.register("focal")
def _focal(cfg: LossConfig) -> nn.Module:
    return FocalLoss(to_onehot_y=True, use_softmax=True, gamma=cfg.focal_gamma)


@LOSSES.register("dice_focal")
def _dice_focal(cfg: LossConfig) -> nn.Module:
    return DiceFocalLoss(
        to_onehot_y=True, softmax=True, gamma=cfg.focal_gamma, lambda_dice=cfg.dice_weight, lambda_focal=cfg.focal_weight
    )


@LOSSES.register("dice_ce")
def _dice_ce(cfg: LossConfig) -> nn.Module:
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=cfg.dice_weight, lambda_ce=cfg.ce_weight)


def build_loss(cfg: LossConfig) -> nn.Module:
    """Builds the loss named by ``cfg.name``.

    Raises:
        ConfigError: ``CONFIG_UNKNOWN_NAME`` for an unregistered name.
    """
    return LOSSES.get(cfg.name)(cfg)
