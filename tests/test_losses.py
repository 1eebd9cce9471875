import pytest
import torch
from monai.losses import DiceLoss, FocalLoss

from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.losses import LOSSES, build_loss


def _batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 4)
    labels = torch.randint(0, 3, (2, 1, 8, 8, 4)).float()
    return logits, labels


def test_dice_focal_equals_weighted_sum_of_parts():
    cfg = load_config("smoke", ["loss.name=dice_focal", "loss.dice_weight=0.7", "loss.focal_weight=1.9"]).loss
    logits, labels = _batch()
    combined = build_loss(cfg)(logits, labels)
    dice = DiceLoss(to_onehot_y=True, softmax=True)(logits, labels)
    focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=cfg.focal_gamma)(logits, labels)
    assert torch.allclose(combined, 0.7 * dice + 1.9 * focal, atol=1e-6)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_is_finite_and_lower_for_the_right_answer(name: str):
    loss = build_loss(load_config("smoke", [f"loss.name={name}"]).loss)
    _, labels = _batch()
    onehot = torch.nn.functional.one_hot(labels[:, 0].long(), 3).permute(0, 4, 1, 2, 3).float()
    good, bad = loss(onehot * 20 - 10, labels), loss(-onehot * 20 + 10, labels)
    assert torch.isfinite(good) and torch.isfinite(bad) and good < bad


def test_unknown_loss():
    with pytest.raises(ConfigError) as info:
        build_loss(load_config("smoke", ["loss.name=dice_focall"]).loss)
    assert info.value.code == "CONFIG_UNKNOWN_NAME" and "dice_focal" in info.value.hint


def test_dice_ce_equals_weighted_sum_of_parts():
    cfg = load_config("smoke", ["loss.name=dice_ce", "loss.dice_weight=1.3", "loss.ce_weight=0.4"]).loss
    logits, labels = _batch()
    combined = build_loss(cfg)(logits, labels)
    dice = DiceLoss(to_onehot_y=True, softmax=True)(logits, labels)
    ce = torch.nn.functional.cross_entropy(logits, labels[:, 0].long())
    assert torch.allclose(combined, 1.3 * dice + 0.4 * ce, atol=1e-6)


def test_focal_term_uses_softmax_like_the_dice_term():
    """With gamma=0 the softmax focal loss reduces to cross-entropy (MONAI's DiceFocalLoss would not)."""
    cfg = load_config("smoke", ["loss.name=focal", "loss.focal_gamma=0"]).loss
    logits, labels = _batch()
    focal = build_loss(cfg)(logits, labels)
    ce = torch.nn.functional.cross_entropy(logits, labels[:, 0].long(), reduction="none")  # (B, X, Y, Z)
    # MONAI's focal loss sums over classes of one-hot CE terms then averages over all elements of (B, K, ...)
    assert torch.allclose(focal, ce.mean() / 3, atol=1e-5)
