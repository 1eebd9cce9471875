"""Pieces of the training loop: device choice, case splits, LR schedule, deep supervision, validation, curves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg.config import Config
from medseg.errors import ConfigError
from medseg.io.dataset import Case
from medseg.metrics.overlap import per_label_dice
from medseg.transforms.pipeline import IMAGE, LABEL


def select_device(name: str) -> torch.device:
    """Maps ``auto|cpu|cuda|mps`` to a device; ``auto`` prefers CUDA, then MPS, then CPU.

    Raises:
        ConfigError: ``DEVICE_UNAVAILABLE`` when the requested device is not present.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("DEVICE_UNAVAILABLE", "device is cuda but no CUDA GPU is visible", "use device auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("DEVICE_UNAVAILABLE", "device is mps but MPS is not available", "use device auto or cpu")
    return torch.device(name)


def split_cases(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Seeded train/validation split; at least one case on each side.

    Raises:
        ConfigError: ``DATASET_TOO_SMALL`` with fewer than two training cases.
    """
    if len(cases) < 2:
        raise ConfigError("DATASET_TOO_SMALL", f"need at least 2 training cases to hold one out, found {len(cases)}")
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(max(1, round(len(cases) * val_fraction)), len(cases) - 1)
    val = sorted((cases[i] for i in order[:n_val]), key=lambda c: c.id)
    train = sorted((cases[i] for i in order[n_val:]), key=lambda c: c.id)
    return train, val


def lr_factor(cfg: Config):
    """LR multiplier per optimizer step: linear warm-up, then cosine to 0 or polynomial decay
    (``train.poly_exponent``, 0.9 as in nnU-Net)."""
    warmup = cfg.train.warmup_epochs * cfg.train.iterations_per_epoch
    total = cfg.train.epochs * cfg.train.iterations_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.train.schedule == "poly":
            return (1.0 - progress) ** cfg.train.poly_exponent
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def check_resolved(cfg: Config) -> None:
    """Every planned value is set and the patch fits the network.

    Raises:
        ConfigError: ``CONFIG_MISSING_KEY`` / ``CONFIG_INVALID_VALUE``.
    """
    for key, value in (("data.spacing", cfg.data.spacing), ("data.patch_size", cfg.data.patch_size),
                       ("model.channels", cfg.model.channels), ("model.strides", cfg.model.strides),
                       ("train.batch_size", cfg.train.batch_size)):
        if value is None:
            raise ConfigError("CONFIG_MISSING_KEY", f"{key} is null after planning",
                              "set it, or leave both model.channels and model.strides null")
    if len(cfg.data.patch_size) != len(cfg.data.spacing):
        raise ConfigError("CONFIG_INVALID_VALUE", "data.patch_size and data.spacing must have the same length")
    divisor = int(np.prod(cfg.model.strides))
    if any(p % divisor for p in cfg.data.patch_size):
        raise ConfigError(
            "CONFIG_INVALID_VALUE",
            f"data.patch_size {list(cfg.data.patch_size)} must be divisible by {divisor} (product of model.strides)",
        )
    from medseg.models.registry import MODELS

    min_batch = getattr(MODELS.get(cfg.model.name), "min_batch", 1)
    if cfg.train.batch_size < min_batch:
        raise ConfigError("CONFIG_INVALID_VALUE", f"{cfg.model.name} trains with train.batch_size of at least {min_batch} "
                          f"(found {cfg.train.batch_size}): its BatchNorm needs more than one sample", f"set train.batch_size={min_batch}")


def final_output(output: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The full-resolution prediction of a network that may return deep-supervision outputs."""
    return output[-1] if isinstance(output, (list, tuple)) else output


def deep_supervision_loss(loss_fn: nn.Module, output: torch.Tensor | list[torch.Tensor], label: torch.Tensor,
                          decay: float = 0.5) -> torch.Tensor:
    """Loss of one output, or the weighted mean over deep-supervision outputs: each coarser output weighs
    ``decay`` (``train.deep_supervision_decay``) times the next finer one, the final output 1."""
    if not isinstance(output, (list, tuple)):
        return loss_fn(output, label)
    weights = [decay ** (len(output) - 1 - i) for i in range(len(output))]
    return sum(w * loss_fn(o, label) for w, o in zip(weights, output)) / sum(weights)


def validate(model: nn.Module, predictor, val_ds, labels: list[int]) -> dict[int, float]:
    """Mean Dice per label over the validation cases, each predicted on its preprocessed grid by ``predictor``
    (:meth:`medseg.inference.predictor.Predictor.for_network` over ``model``: the code of ``medseg predict``)."""
    was_training = model.training
    model.eval()
    scores: dict[int, list[float]] = {lab: [] for lab in labels}
    for index in range(len(val_ds)):
        item = val_ds[index]
        pred = predictor.predict_preprocessed(item[IMAGE].as_tensor()).astype(np.int64)  # (X, Y[, Z])
        ref = item[LABEL].as_tensor()[0].cpu().numpy().round().astype(np.int64)
        for lab, value in per_label_dice(pred, ref, labels).items():
            scores[lab].append(value)
    model.train(was_training)
    return {lab: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan") for lab, v in scores.items()}


def save_curves(history: list[dict], path: Path) -> None:
    """Training loss and validation Dice per label against epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot([h["epoch"] for h in history], [h["train_loss"] for h in history])
    ax1.set(xlabel="epoch", ylabel="train loss")
    val = [h for h in history if "val_dice_mean" in h]
    for key in sorted({k for h in val for k in h if k.startswith("val_dice_")}):
        ax2.plot([h["epoch"] for h in val], [h[key] for h in val], marker="o", label=key.removeprefix("val_dice_"))
    ax2.set(xlabel="epoch", ylabel="validation Dice", ylim=(0, 1))
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
