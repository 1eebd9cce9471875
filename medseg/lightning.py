"""PyTorch Lightning: train a medseg configuration with ``lightning.pytorch.Trainer``, your callbacks and loggers.

:func:`from_config` prepares a run exactly as ``medseg train`` does (dataset, plan, split, cached preprocessing,
augmentation, network, loss, optimizer, schedule: the same functions of :mod:`medseg.training.trainer`, in the
same order, so with one seed the same numbers) and returns a :class:`MedsegModule` (the network, the loss, the
schedule, sliding-window validation through the predictor ``medseg predict`` uses) and a :class:`MedsegDataModule`
(the training loader). Lightning owns the loop: optimisation steps (``accumulate_grad_batches``), mixed precision,
checkpoints, callbacks and loggers (``MLFlowLogger``, ``TensorBoardLogger``, ...)::

    import lightning.pytorch as L
    from medseg.config import load_config
    from medseg.lightning import from_config, trainer_arguments

    cfg = load_config("smoke", ["data.dataset=sample_data/ct3d"])
    module, data = from_config(cfg, "runs/lightning")
    L.Trainer(**trainer_arguments(cfg), logger=L.loggers.CSVLogger("runs/lightning")).fit(module, datamodule=data)
    # runs/lightning/model is a medseg model folder: medseg predict -m runs/lightning/model ...

Each epoch logs ``train_loss``, ``lr``, ``epoch_time_s``, ``samples_per_s`` and, when validation is due
(``train.val_every``), ``val_dice_<label>`` and ``val_dice_mean``, the names ``medseg train`` gives MLflow; the
best epoch's model folder is ``RUN/model`` and the last one's ``RUN/model_last`` (both calibrated as configured),
with ``history.json`` and the curves. Early stopping (``train.early_stopping``) stops the Trainer. A Lightning
checkpoint carries medseg's state too (history, best Dice, every random state), so ``fit(ckpt_path=...)``
continues the run. One process: medseg's multi-GPU training is ``medseg train`` under ``torchrun``.

Needs ``pip install 'medseg[lightning]'``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import ConfigError, require_extra

require_extra("lightning", "lightning", "medseg.lightning")

import lightning.pytorch as L  # noqa: E402 - after the coded refusal above

from medseg.config import Config, config_to_dict, flatten, shareable  # noqa: E402
from medseg.models.contract import deep_supervision_loss  # noqa: E402
from medseg.training import trainer as loop  # noqa: E402
from medseg.training.checkpoint import capture_rng, restore_rng  # noqa: E402
from medseg.transforms.pipeline import IMAGE, LABEL  # noqa: E402


def from_config(cfg: Config, run_dir: str | Path, split: tuple[list[str], list[str]] | None = None
                ) -> tuple[MedsegModule, MedsegDataModule]:
    """The Lightning module and data module of a medseg run in ``run_dir`` (written as ``medseg train`` writes it:
    config, plan, fingerprint, splits, cache; model folders at the end).

    Raises:
        ConfigError / TrainingError: as :func:`medseg.training.trainer.fit` (``DATASET_TOO_SMALL``, ...).
    """
    run = loop._prepare(cfg, Path(run_dir), None, False, split, None)
    loop._optimisation(run, False)
    state = loop._restore_or_begin(run, False)
    return MedsegModule(run, state), MedsegDataModule(run)


def trainer_arguments(cfg: Config) -> dict[str, Any]:
    """The ``Trainer`` arguments that make Lightning train as the configuration says: epochs, gradient accumulation,
    mixed precision on CUDA (``train.amp``), no sanity validation and no Lightning validation loop (medseg validates
    at the epoch's end, every ``train.val_every`` epochs). Add your own (callbacks, logger, devices=1, ...)."""
    cuda = cfg.train.device in ("auto", "cuda") and torch.cuda.is_available()
    precision = "32-true"
    if cfg.train.amp and cuda:
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return {"max_epochs": cfg.train.epochs, "accumulate_grad_batches": cfg.train.accumulate, "precision": precision,
            "num_sanity_val_steps": 0, "accelerator": "gpu" if cuda else "cpu", "devices": 1}


class MedsegDataModule(L.LightningDataModule):
    """The training loader of a prepared run: cached preprocessing, then augmentation; ``iterations_per_epoch x
    accumulate`` batches an epoch, drawn with replacement by the run's seeded sampler."""

    def __init__(self, run: Any) -> None:
        super().__init__()
        self.run = run

    def train_dataloader(self) -> Any:
        return self.run.loader


class MedsegModule(L.LightningModule):
    """A prepared medseg run as a LightningModule (see the module docstring); ``model_dir`` is the best model folder
    once training ends."""

    def __init__(self, run: Any, state: loop.TrainState) -> None:
        super().__init__()
        self.run, self.state = run, state
        self.net = run.net
        self._losses: list[torch.Tensor] = []
        self._started = 0.0

    @property
    def model_dir(self) -> Path:
        return self.run.run_dir / "model"

    def forward(self, x: torch.Tensor) -> Any:
        return self.net(x)

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            raise ConfigError("CONFIG_INVALID_VALUE", "medseg.lightning trains in one process",
                              "for several GPUs or nodes run medseg train under torchrun")

    def on_fit_start(self) -> None:
        cfg = self.run.cfg
        if self.device != self.run.device:  # the predictor, and the run's record of its device, follow Lightning's choice
            self.run.device = self.device
            from medseg.inference.predictor import Predictor

            self.run.validator = Predictor.for_network(self.net, cfg, self.run.plan, self.run.model_info, self.device)
        for logger in self.loggers:
            logger.log_hyperparams(flatten(config_to_dict(shareable(cfg))))

    def configure_optimizers(self) -> Any:
        return {"optimizer": self.run.optimizer, "lr_scheduler": {"scheduler": self.run.scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any = None) -> None:
        scheduler.step()  # the warm-up + plateau schedule is not a torch LRScheduler; its drops come at validation

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        """``train.grad_clip`` as ``medseg train`` clips (a Trainer's own ``gradient_clip_val`` is added on top)."""
        if self.run.cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.run.cfg.train.grad_clip)
        if gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_train_epoch_start(self) -> None:
        from medseg import threads

        threads.refresh()
        self._losses, self._started = [], time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image, label = batch[IMAGE].as_tensor(), batch[LABEL].as_tensor()
        loss = deep_supervision_loss(self.run.loss_fn, self.net(image), label, self.run.cfg.train.deep_supervision_decay)
        if not torch.isfinite(loss):
            raise loop.nonfinite_loss(f"epoch {self.current_epoch + 1}, batch {batch_idx}", batch["case_id"])
        self._losses.append(loss.detach())
        return loss

    def on_train_epoch_end(self) -> None:
        run, state, epoch = self.run, self.state, self.current_epoch + 1
        record = loop.epoch_record(run, epoch, [v.item() for v in self._losses], time.perf_counter() - self._started)
        if loop._validate_and_keep_best(run, state, record):
            self.trainer.should_stop = True
        state.history.append(record)
        state.epoch, state.step = epoch, self.global_step
        self.log_dict({k: float(v) for k, v in record.items() if k != "epoch" and np.isfinite(v)})

    def on_train_end(self) -> None:
        loop._finish(self.run, self.state)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medseg"] = {**self.state.to_checkpoint(), "rng": capture_rng(self.run.augment, self.run.sampler_gen)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint["medseg"]
        self.state = loop.TrainState.from_checkpoint(saved)
        restore_rng(saved["rng"], self.run.augment, self.run.sampler_gen)
