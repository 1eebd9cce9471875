"""Optimizers (a registry, like losses) and the learning-rate schedules.

An optimizer is one function registered under the name ``train.optimizer`` selects::

    @OPTIMIZERS.register("adamw")
    def adamw(params, train: TrainConfig) -> torch.optim.Optimizer: ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from medseg.config import Config, TrainConfig
from medseg.registry import Registry

OPTIMIZERS: Registry[Callable[[Iterable[torch.nn.Parameter], TrainConfig], torch.optim.Optimizer]] = Registry(
    "optimizer", "train.optimizer")


@OPTIMIZERS.register("adamw")
def adamw(params: Iterable[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with ``train.lr`` and ``train.weight_decay``."""
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


@OPTIMIZERS.register("sgd")
def sgd(params: Iterable[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum ``train.momentum`` (nnU-Net's 0.99), ``train.lr`` and ``train.weight_decay``."""
    return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, nesterov=True, weight_decay=train.weight_decay)


def build_optimizer(params: Iterable[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer`` names.

    Raises:
        ConfigError: ``CONFIG_UNKNOWN_NAME`` listing the registered ones.
    """
    return OPTIMIZERS.get(train.optimizer)(params, train)


def lr_factor(cfg: Config) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warm-up, then cosine to 0 or polynomial decay
    (``train.poly_exponent``, 0.9 as in nnU-Net); the ``plateau`` schedule keeps 1 after the warm-up (its drops come
    from :class:`WarmupPlateau`).

    Examples:
        >>> from medseg.config import load_config
        >>> cfg = load_config(None, ["train.epochs=2", "train.iterations_per_epoch=5", "train.warmup_epochs=1"])
        >>> factor = lr_factor(cfg)
        >>> [round(factor(step), 2) for step in (0, 4, 5, 9)]
        [0.2, 1.0, 1.0, 0.1]
    """
    warmup = cfg.train.warmup_epochs * cfg.train.iterations_per_epoch
    total = cfg.train.epochs * cfg.train.iterations_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.train.schedule == "plateau":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.train.schedule == "poly":
            return (1.0 - progress) ** cfg.train.poly_exponent
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class WarmupPlateau:
    """The ``plateau`` schedule: the linear warm-up of :func:`lr_factor` per optimizer step, then torch's
    ``ReduceLROnPlateau`` on the validation Dice (mode ``max``; ``train.plateau_factor``, ``train.plateau_patience``
    validations), told each validation's mean Dice through :meth:`validated`.

    A ``LambdaLR`` cannot carry the warm-up here: it rewrites the LR at every step and would undo the plateau's
    drops. The state (:meth:`state_dict`) holds plain values only, so a resumed run continues exactly.

    Examples:
        >>> from medseg.config import load_config
        >>> cfg = load_config(None, ["train.schedule=plateau", "train.warmup_epochs=1", "train.iterations_per_epoch=2",
        ...                          "train.lr=1.0", "train.plateau_patience=0", "train.plateau_factor=0.5"])
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
        >>> schedule = WarmupPlateau(opt, cfg)
        >>> lrs = [opt.param_groups[0]["lr"]]
        >>> schedule.step(); lrs.append(opt.param_groups[0]["lr"]); schedule.step()
        >>> for dice in (0.5, 0.4, 0.6, 0.6):
        ...     schedule.validated(dice); lrs.append(opt.param_groups[0]["lr"])
        >>> lrs  # warm-up 0.5, 1.0; then 0.5 Dice (best), 0.4 (drop), 0.6 (best), 0.6 (no gain: drop)
        [0.5, 1.0, 1.0, 0.5, 0.5, 0.25]
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Config) -> None:
        self.optimizer = optimizer
        self.factor = lr_factor(cfg)
        self.warmup = cfg.train.warmup_epochs * cfg.train.iterations_per_epoch
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.steps = 0
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.train.plateau_factor, patience=cfg.train.plateau_patience)
        self._set_warmup_lr()

    def _set_warmup_lr(self) -> None:
        if self.steps <= self.warmup:  # the warm-up's last value (factor 1) is set once; then the plateau owns the LR
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * self.factor(self.steps)

    def step(self) -> None:
        """After each optimizer step: the warm-up's next LR."""
        self.steps += 1
        self._set_warmup_lr()

    def validated(self, dice: float) -> None:
        """After each validation (its mean Dice): ReduceLROnPlateau's step, once the warm-up is over."""
        if self.steps >= self.warmup and math.isfinite(dice):
            self.plateau.step(dice)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "base_lrs": list(self.base_lrs), "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.base_lrs = int(state["steps"]), [float(v) for v in state["base_lrs"]]
        self.plateau.load_state_dict(state["plateau"])


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Config) -> Any:
    """The LR schedule ``train.schedule`` names, stepped after every optimizer step: a ``LambdaLR`` over
    :func:`lr_factor` (``cosine``, ``poly``) or :class:`WarmupPlateau` (``plateau``), which is also told every
    validation's Dice (:func:`after_validation`)."""
    if cfg.train.schedule == "plateau":
        return WarmupPlateau(optimizer, cfg)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))


def after_validation(schedule: Any, dice: float) -> None:
    """Tells a schedule that follows the validation Dice (``plateau``) the latest mean Dice; others ignore it."""
    if isinstance(schedule, WarmupPlateau):
        schedule.validated(dice)


def check_config(cfg: Config) -> None:
    """What ``medseg train``, ``demo`` and ``distill`` check before reading a case or opening a run: the network
    (:func:`medseg.models.registry.check_network`), the loss and the optimizer names.

    Raises:
        ConfigError: ``CONFIG_UNKNOWN_NAME``, ``CONFIG_INVALID_VALUE``, ``MODEL_DEPENDENCY_MISSING``.
    """
    from medseg.models.registry import check_network

    check_network(cfg)
    OPTIMIZERS.get(cfg.train.optimizer)
