"""Loss registry. Every loss takes logits ``(B, K, *spatial)`` and integer labels ``(B, 1, *spatial)``.

``loss.activation`` is chosen once and used by every term: ``softmax`` over the K classes, or ``sigmoid`` per
channel against the one-hot labels (each class an independent binary problem).

Combined losses are explicit weighted sums of their parts (:class:`WeightedSum`). MONAI's ``DiceFocalLoss``
is not used: with ``softmax=True`` its focal term still applies a sigmoid (MONAI 1.6), silently mixing two
activations.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss, FocalLoss
from torch import nn

from medseg.config import LossConfig
from medseg.registry import Registry

LOSSES: Registry = Registry("loss", "loss.name")


class CrossEntropy(nn.Module):
    """Cross-entropy on logits ``(B, K, *spatial)`` and labels ``(B, 1, *spatial)``; with ``sigmoid``, binary
    cross-entropy per channel against the one-hot labels."""

    def __init__(self, sigmoid: bool = False) -> None:
        super().__init__()
        self.sigmoid = sigmoid

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.sigmoid:
            return nn.functional.cross_entropy(logits, labels[:, 0].long())
        onehot = nn.functional.one_hot(labels[:, 0].long(), logits.shape[1]).movedim(-1, 1).to(logits.dtype)
        return nn.functional.binary_cross_entropy_with_logits(logits, onehot)


class WeightedSum(nn.Module):
    """``sum_i weight_i * loss_i(logits, labels)``; terms with weight 0 are skipped."""

    def __init__(self, terms: list[tuple[float, nn.Module]]) -> None:
        super().__init__()
        self.weights = [w for w, _ in terms if w > 0]
        self.terms = nn.ModuleList([loss for w, loss in terms if w > 0])

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros(())
        for weight, term in zip(self.weights, self.terms):
            total = total + weight * term(logits, labels)
        return total


def _dice_part(cfg: LossConfig) -> nn.Module:
    softmax = cfg.activation == "softmax"
    return DiceLoss(to_onehot_y=True, softmax=softmax, sigmoid=not softmax)


def _focal_part(cfg: LossConfig) -> nn.Module:
    return FocalLoss(to_onehot_y=True, use_softmax=cfg.activation == "softmax", gamma=cfg.focal_gamma)


@LOSSES.register("dice")
def _dice(cfg: LossConfig) -> nn.Module:
    return _dice_part(cfg)


@LOSSES.register("focal")
def _focal(cfg: LossConfig) -> nn.Module:
    return _focal_part(cfg)


@LOSSES.register("dice_focal")
def _dice_focal(cfg: LossConfig) -> nn.Module:
    return WeightedSum([(cfg.dice_weight, _dice_part(cfg)), (cfg.focal_weight, _focal_part(cfg))])


@LOSSES.register("dice_ce")
def _dice_ce(cfg: LossConfig) -> nn.Module:
    return WeightedSum([(cfg.dice_weight, _dice_part(cfg)), (cfg.ce_weight, CrossEntropy(cfg.activation == "sigmoid"))])


def build_loss(cfg: LossConfig) -> nn.Module:
    """Builds the loss named by ``cfg.name``.

    Raises:
        ConfigError: ``CONFIG_UNKNOWN_NAME`` for an unregistered name.

    Examples:
        >>> import torch
        >>> from medseg.config import load_config
        >>> loss = build_loss(load_config("smoke").loss)
        >>> logits = torch.full((1, 2, 4, 4), -10.0)
        >>> logits[:, 1] = 10.0  # confident foreground everywhere
        >>> perfect = loss(logits, torch.ones(1, 1, 4, 4))
        >>> wrong = loss(logits, torch.zeros(1, 1, 4, 4))
        >>> bool(perfect < 0.05 < wrong)
        True
    """
    return LOSSES.get(cfg.name)(cfg)
