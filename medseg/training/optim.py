"""Optimizers (a registry, like losses) and the learning-rate schedule.

An optimizer is one function registered under the name ``train.optimizer`` selects::

    @OPTIMIZERS.register("adamw")
    def adamw(params, train: TrainConfig) -> torch.optim.Optimizer: ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

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
    (``train.poly_exponent``, 0.9 as in nnU-Net).

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
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.train.schedule == "poly":
            return (1.0 - progress) ** cfg.train.poly_exponent
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def check_config(cfg: Config) -> None:
    """What ``medseg train``, ``demo`` and ``distill`` check before reading a case or opening a run: the network
    (:func:`medseg.models.registry.check_network`), the loss and the optimizer names.

    Raises:
        ConfigError: ``CONFIG_UNKNOWN_NAME``, ``CONFIG_INVALID_VALUE``, ``MODEL_DEPENDENCY_MISSING``.
    """
    from medseg.models.registry import check_network

    check_network(cfg)
    OPTIMIZERS.get(cfg.train.optimizer)
