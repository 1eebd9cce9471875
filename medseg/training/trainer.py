"""The training loop: ``fit(cfg, run_dir)`` -> model folders, checkpoints and one tracked run.

Run folder layout::

    RUN/config.yaml            resolved configuration (plan-derived values filled in)
    RUN/fingerprint.json, RUN/plan.json   dataset fingerprint and the plan made from it
    RUN/cache/                 preprocessed cases (data.cache: disk; data.cache_dir moves it)
    RUN/splits.json            train/validation case IDs
    RUN/model/                 best model folder (validation Dice); RUN/model_last/ the final epoch's
    RUN/checkpoints/last.pt    full training state after the last complete epoch (atomic); last.json its epoch
    RUN/history.json, RUN/training_curves.png
    RUN/mlflow.db, RUN/mlartifacts/   embedded MLflow store (unless tracking.uri points elsewhere)
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.data.utils import worker_init_fn as monai_worker_init
from monai.utils import set_determinism
from torch import nn

from medseg import threads
from medseg.config import Config, config_hash, config_to_dict, flatten, planned, save_config, shareable
from medseg.device import select_device
from medseg.errors import ConfigError, TrainingError
from medseg.fsutil import git_commit, json_hash, read_json, versions, write_json, write_text
from medseg.io.dataset import Case, Dataset, load_configured
from medseg.losses import build_loss
from medseg.models import build_model
from medseg.models.contract import deep_supervision_loss
from medseg.models.folder import save_model_dir
from medseg.models.registry import check_resolved
from medseg.plan.fingerprint import Fingerprint, load_or_compute
from medseg.plan.planner import Plan, apply_plan, make_plan
from medseg.progress import progress_bar
from medseg.training import distributed as ddp
from medseg.training.checkpoint import LAST, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from medseg.training.curves import save_curves
from medseg.training.data import CaseDataset, PreprocessedCache
from medseg.training.distill import combined_loss
from medseg.training.folds import split_cases
from medseg.training.optim import after_validation, build_optimizer, build_schedule
from medseg.training.tracker import NullTracker, Tracker
from medseg.training.validation import validate
from medseg.transforms.pipeline import (
    IMAGE,
    LABEL,
    build_augment_transforms,
    build_preprocess_transforms,
    preprocessing_hash,
)

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What :func:`fit` produced."""

    run_dir: Path
    model_dir: Path
    best_metric: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    is_main: bool = True


def plan_run(cfg: Config, dataset: Dataset, run_dir: Path, device: torch.device, write: bool = True) -> tuple[Config, Plan]:
    """Fingerprints the dataset (``RUN/fingerprint.json``), plans, fills unpinned config values, saves ``plan.json``."""
    from medseg.models.registry import spec_of

    fingerprint = load_or_compute(dataset, run_dir / "fingerprint.json", cfg.plan.ct_clip_percentiles)
    spec = spec_of(cfg.model.name)
    hints = spec.plan_hints(cfg.model, fingerprint.dims) if spec.plan_hints else {}
    plan = make_plan(fingerprint, cfg.plan.model_copy(update=hints), on_gpu=device.type == "cuda",
                     fixed_levels=spec.fixed_levels, memory_factor=spec.memory_factor)
    if hints:
        plan.notes.append(f"{cfg.model.name} (size {cfg.model.size}): plan settings {hints}")
    if write:
        write_text(run_dir / "plan.json", plan.to_json())
    return apply_plan(cfg, plan), plan


def _pretrained(net: nn.Module, cfg: Config, run_dir: Path, resume: bool, is_main: bool) -> dict | None:
    """Loads ``model.pretrained`` into ``net`` at the start of a run (a resumed run has it in its checkpoint);
    returns what ``RUN/pretrained.json`` records (file name, SHA-256, loaded/missing/unexpected tensors)."""
    record = run_dir / "pretrained.json"
    if resume or not cfg.model.pretrained:
        return read_json(record, "CHECKPOINT_UNREADABLE", "pretrained record") if resume and record.is_file() else None
    from medseg.fsutil import sha256_file
    from medseg.models.pretrained import load_pretrained

    source = Path(cfg.model.pretrained)
    report = load_pretrained(net, source).to_dict()
    report["sha256"] = sha256_file(source / "weights.pt" if source.is_dir() else source)
    if is_main:
        write_json(record, report)
    return report


def _qc_reference(run_dir: Path) -> dict | None:
    """The QC reference of the model folders (ranges over the training cases; :mod:`medseg.qc.reference`)."""
    from medseg.qc.reference import qc_reference

    path = run_dir / "fingerprint.json"
    return qc_reference(Fingerprint.from_json(path.read_text())) if path.is_file() else None


def calibrate_model_dir(model_dir: Path, val_ds, device: torch.device) -> dict:
    """Fits the softmax temperature of a model folder on the validation cases (their preprocessed grids, blended
    as ``medseg predict`` blends) and records it in ``model.json`` under ``qc`` (see
    :func:`medseg.qc.reference.fit_temperature`)."""
    from medseg.inference.predictor import Predictor
    from medseg.models.folder import INFO, load_model_dir, read_info, write_info
    from medseg.qc.reference import fit_temperature

    net, cfg, plan, info = load_model_dir(model_dir, device)
    assert net is not None  # the run's own (PyTorch) model folder
    predictor = Predictor.for_network(net, cfg, plan, info, device)
    predictor.tta = False  # the temperature belongs to the single model's blended logits
    logits, refs = [], []
    for index in range(len(val_ds)):
        item = val_ds[index]
        logits.append(predictor.logits_preprocessed(item[IMAGE].as_tensor()))
        refs.append(item[LABEL].as_tensor()[0].cpu().numpy().round().astype(np.int64))
    fitted = fit_temperature(logits, refs)
    record = read_info(model_dir)
    record["qc"] = {**(record.get("qc") or {}), **fitted, "calibration_cases": len(refs)}
    write_info(model_dir / INFO, record)
    log.info("%s: softmax temperature %.3g (validation NLL %.4f -> %.4f)", model_dir.name, fitted["temperature"],
             fitted["nll_before"], fitted["nll_after"])
    return fitted


def dataset_hash(dataset: Dataset) -> str:
    """Short hash of the dataset description and the size of every training file (not the patient data)."""
    parts = [(c.id, c.image.stat().st_size, c.label.stat().st_size if c.label else 0) for c in dataset.training]
    return json_hash({"name": dataset.name, "labels": dataset.labels, "files": parts})


def _items(cases: list[Case]) -> list[dict]:
    return [
        {IMAGE: [str(p) for p in c.images] if len(c.images) > 1 else str(c.image), LABEL: str(c.label), "case_id": c.id}
        for c in cases
    ]


def _select_split(dataset: Dataset, cfg: Config, split: tuple[list[str], list[str]] | None) -> tuple[list[Case], list[Case]]:
    if split is None:
        return split_cases(dataset.training, cfg.data.val_fraction, cfg.seed)
    by_id = {c.id: c for c in dataset.training}
    return [by_id[i] for i in split[0]], [by_id[i] for i in split[1]]


def train_step(model, loss_fn, optimizer, scaler, scheduler, batch, cfg: Config, device, use_amp, amp_dtype,
               teachers=None) -> torch.Tensor:
    """One optimisation step on one batch ``{image (B, C, *patch), label (B, 1, *patch)}`` (no accumulation);
    returns the loss (a non-finite loss skips the update and is returned for the caller to stop on)."""
    optimizer.zero_grad(set_to_none=True)
    loss = backward_step(model, loss_fn, scaler, batch, cfg, device, use_amp, amp_dtype, teachers)
    if torch.isfinite(loss):
        optimizer_step(model, optimizer, scaler, scheduler, cfg)
    return loss


def backward_step(model, loss_fn, scaler, batch, cfg: Config, device, use_amp, amp_dtype, teachers=None,
                  share: float = 1.0) -> torch.Tensor:
    """Forward and backward of one batch: its gradients, times ``share`` (``1 / train.accumulate``), add to those
    already in the parameters. Returns the (unscaled) loss; a non-finite one is not backpropagated."""
    image = batch[IMAGE].as_tensor().to(device)  # (B, C, *patch)
    label = batch[LABEL].as_tensor().to(device)  # (B, 1, *patch)
    try:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            output = model(image)
            loss = deep_supervision_loss(loss_fn, output, label, cfg.train.deep_supervision_decay)
            if teachers is not None:  # medseg distill: the frozen teachers' softened probabilities of this patch
                loss = combined_loss(loss, output, teachers.soft_targets(image), cfg.distill.temperature, cfg.distill.weight)
        if torch.isfinite(loss):
            scaler.scale(loss * share).backward()
    except torch.cuda.OutOfMemoryError:
        raise _out_of_memory(cfg) from None
    return loss.detach()


def optimizer_step(model, optimizer, scaler, scheduler, cfg: Config) -> None:
    """The update from the gradients gathered: clipping (``train.grad_clip``), the (AMP-scaled) optimizer step,
    the schedule's next learning rate."""
    try:
        if cfg.train.grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    except torch.cuda.OutOfMemoryError:
        raise _out_of_memory(cfg) from None


def _out_of_memory(cfg: Config) -> TrainingError:
    return TrainingError(
        "CUDA_OUT_OF_MEMORY",
        f"GPU out of memory with patch {list(planned(cfg.data.patch_size, 'data.patch_size'))} and batch size {cfg.train.batch_size}",
        "lower data.patch_size or train.batch_size (train.accumulate keeps the effective batch), or plan.gpu_memory_gb "
        "and let the plan choose",
    )


def samples_per_epoch(cfg: Config) -> int:
    """``iterations_per_epoch`` optimizer steps x ``accumulate`` batches x ``batch_size``."""
    return cfg.train.iterations_per_epoch * cfg.train.accumulate * planned(cfg.train.batch_size, "train.batch_size")


def _init_worker(worker_id: int) -> None:
    """DataLoader workers: one thread each (they share the process's CPUs), then MONAI's transform seeding."""
    threads.limit_worker()
    monai_worker_init(worker_id)


@dataclass
class TrainState:
    """Where a run is: what a checkpoint stores besides the network, optimizer, scheduler, scaler and random
    states, and what a resumed run continues from."""

    epoch: int = 0  # the last complete epoch
    step: int = 0
    best_metric: float = -1.0
    best_epoch: int = 0
    stale: int = 0  # validations without improvement (early stopping)
    history: list[dict] = field(default_factory=list)

    def to_checkpoint(self) -> dict[str, Any]:
        """The checkpoint keys of this state (``best_metric`` and the rest; the layout of ``last.pt``)."""
        return {"epoch": self.epoch, "step": self.step, "best_metric": self.best_metric, "best_epoch": self.best_epoch,
                "stale": self.stale, "history": self.history}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> TrainState:
        return cls(int(ckpt["epoch"]), int(ckpt["step"]), float(ckpt["best_metric"]), int(ckpt["best_epoch"]),
                   int(ckpt["stale"]), list(ckpt["history"]))


@dataclass
class _Run:
    """Everything :func:`fit` prepares once: settings, data, network and optimisation."""

    cfg: Config
    plan: Plan
    run_dir: Path
    dataset: Dataset
    rank: ddp.DistInfo
    device: torch.device
    tracker: Tracker
    train_cases: list[Case]
    val_cases: list[Case]
    cache: PreprocessedCache
    augment: Any
    val_ds: CaseDataset
    loader: DataLoader
    sampler_gen: torch.Generator
    distiller: Any = None
    net: Any = None  # the nn.Module, built by the optimisation step
    model: Any = None  # net, or its DDP wrapper
    loss_fn: Any = None
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    use_amp: bool = False
    amp_dtype: torch.dtype = torch.float16
    pretrained: dict | None = None
    model_info: dict = field(default_factory=dict)
    validator: Any = None

    @property
    def n_samples(self) -> int:
        """Samples per epoch: ``iterations_per_epoch`` optimizer steps of ``accumulate`` batches each."""
        return samples_per_epoch(self.cfg)

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / LAST


def fit(
    cfg: Config,
    run_dir: str | Path,
    tracker: Tracker | None = None,
    show_progress: bool = True,
    resume: bool = False,
    split: tuple[list[str], list[str]] | None = None,
    teachers: list[Path] | None = None,
) -> FitResult:
    """Trains a model as configured and writes the run folder: prepare (data, plan, split), optimisation
    (network, loss, optimizer), restore or begin, then per epoch train, validate and keep the best, save; finish.

    Args:
        cfg: The configuration; ``data.dataset`` must name a dataset folder.
        run_dir: Output folder for the run.
        tracker: Where params, per-epoch metrics and artifacts go (default: nothing is tracked).
        show_progress: Show a live progress bar when the output is a terminal.
        resume: Continue from ``RUN/checkpoints/last.pt`` (model, optimizer, scheduler, scaler, RNG states);
            ``train.epochs`` may be larger than when the run started.
        split: ``(train IDs, validation IDs)``; default: a seeded split by ``data.val_fraction``.
        teachers: Model folders to distil (``medseg distill``; :mod:`medseg.training.distill`): the student
            learns their averaged softened predictions besides the labels; ``RUN/teachers.json`` records them.

    Returns:
        A :class:`FitResult` naming the best model folder and its validation Dice.

    Raises:
        ConfigError: Bad settings (``DATASET_TOO_SMALL``, ``DEVICE_UNAVAILABLE``, ...).
        TrainingError: ``TRAIN_NONFINITE_LOSS`` (epoch, step, case IDs), ``CUDA_OUT_OF_MEMORY``,
            ``CHECKPOINT_NOT_FOUND``, ``RESUME_NOTHING_TO_DO``, ``RESUME_MISMATCH``.
    """
    run = _prepare(cfg, Path(run_dir), tracker, resume, split, teachers)
    _optimisation(run, resume)
    state = _restore_or_begin(run, resume)
    stopped_early = False
    with progress_bar(show_progress and run.rank.is_main) as progress:
        bars = (progress.add_task("training", total=run.cfg.train.epochs, completed=state.epoch),
                progress.add_task("iterations", total=run.cfg.train.iterations_per_epoch))
        for epoch in range(state.epoch + 1, run.cfg.train.epochs + 1):
            record = _epoch(run, state, epoch, progress, bars[1])
            stop = _validate_and_keep_best(run, state, record)
            state.history.append(record)
            state.epoch = epoch
            _save(run, state, record, progress, bars[0])
            if ddp.any_rank(stop, run.rank):
                log.info("early stopping: no validation improvement in %d validations", run.cfg.train.early_stopping)
                stopped_early = True
                break
    _finish(run, state)
    return FitResult(run.run_dir, run.run_dir / "model", state.best_metric, state.best_epoch, state.history,
                     stopped_early, run.rank.is_main)


def _prepare(cfg: Config, run_dir: Path, tracker: Tracker | None, resume: bool,
             split: tuple[list[str], list[str]] | None, teachers: list[Path] | None) -> _Run:
    """Dataset, device, processes, teachers, plan and split; the run folder's config and splits; the data
    pipeline (cached preprocessing, augmentation, sampler, loader)."""
    if cfg.data.dataset is None:
        raise ConfigError("CONFIG_MISSING_KEY", "data.dataset is not set", "use --set data.dataset=PATH")
    dataset = load_configured(cfg.data)
    device = select_device(cfg.train.device)
    rank = ddp.init_distributed(device.type)
    if rank.enabled and device.type == "cuda":
        device = torch.device("cuda", rank.local_rank)
    tracker = tracker if (tracker is not None and rank.is_main) else NullTracker()
    distiller = None
    if teachers is not None:
        from medseg.training.distill import Teachers, check_same_teachers, student_config

        distiller = Teachers.load(list(teachers), device, cfg.distill.temperature)
        if resume:
            check_same_teachers(distiller, run_dir)
        cfg = student_config(list(teachers), cfg, teacher_cfg=distiller.members[0].cfg)  # loaded: no second read
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank.is_main:
        cfg, plan = plan_run(cfg, dataset, run_dir, device)
    ddp.barrier(rank)
    if not rank.is_main:
        cfg, plan = plan_run(cfg, dataset, run_dir, device, write=False)
    check_resolved(cfg)
    train_cases, val_cases = _select_split(dataset, cfg, split)
    set_determinism(seed=cfg.seed + rank.rank)
    if rank.is_main:
        save_config(cfg, run_dir / "config.yaml")
        write_json(run_dir / "splits.json", {"seed": cfg.seed, "train": [c.id for c in train_cases],
                                             "val": [c.id for c in val_cases]})
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "cache"
    cache = PreprocessedCache(build_preprocess_transforms(cfg, plan), cfg.data.cache, cache_dir, preprocessing_hash(cfg, plan))
    augment = build_augment_transforms(cfg)
    train_ds = CaseDataset(_items(train_cases), cache, augment)
    sampler_gen = torch.Generator().manual_seed(cfg.seed + rank.rank)
    sampler = torch.utils.data.RandomSampler(train_ds, replacement=True, num_samples=samples_per_epoch(cfg), generator=sampler_gen)
    loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                        worker_init_fn=_init_worker)
    return _Run(cfg, plan, run_dir, dataset, rank, device, tracker, train_cases, val_cases, cache, augment,
                CaseDataset(_items(val_cases), cache), loader, sampler_gen, distiller)


def _optimisation(run: _Run, resume: bool) -> None:
    """The network (with pretrained weights at the start of a run; DDP-wrapped under torchrun), the loss, the
    optimizer, the schedule, mixed precision and the predictor validation runs through."""
    cfg, device = run.cfg, run.device
    in_channels = int(run.val_ds[0][IMAGE].shape[0])
    spatial_dims = len(planned(cfg.data.spacing, "data.spacing"))
    labels = run.dataset.labels
    if run.distiller is not None:
        run.distiller.check_student(cfg, run.plan, labels, spatial_dims, in_channels)
        if run.rank.is_main and not resume:
            run.distiller.save(run.run_dir)
    run.net = net = build_model(cfg.model, spatial_dims, in_channels, len(labels)).to(device)
    run.pretrained = _pretrained(net, cfg, run.run_dir, resume, run.rank.is_main)
    run.model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) \
        if run.rank.enabled else net
    run.loss_fn = build_loss(cfg.loss)
    run.optimizer = build_optimizer(net.parameters(), cfg.train)
    run.scheduler = build_schedule(run.optimizer, cfg)
    run.use_amp = cfg.train.amp and device.type == "cuda"
    run.amp_dtype = torch.bfloat16 if run.use_amp and torch.cuda.is_bf16_supported() else torch.float16
    run.scaler = torch.amp.GradScaler("cuda", enabled=run.use_amp and run.amp_dtype == torch.float16)
    pretrained = run.pretrained
    run.model_info = {
        "labels": labels, "spatial_dims": spatial_dims, "in_channels": in_channels, "modality": run.dataset.modality,
        "dataset": run.dataset.name, "qc": _qc_reference(run.run_dir),
        **({"pretrained": {k: pretrained[k] for k in ("file", "sha256", "loaded", "total")}} if pretrained else {}),
        **({"teachers": run.distiller.records(), "distill": cfg.distill.model_dump()} if run.distiller is not None else {}),
    }
    from medseg.inference.predictor import Predictor

    run.validator = Predictor.for_network(net, cfg, run.plan, run.model_info, device)  # what validation predicts with


def _restore_or_begin(run: _Run, resume: bool) -> TrainState:
    """A resumed run's state from its checkpoint (network, optimizer, scheduler, scaler, random states); a new
    run's parameters logged."""
    if not resume:
        if run.rank.is_main:
            run.tracker.log_params(_params(run))
            graph = getattr(run.tracker, "log_graph", None)
            if graph is not None:  # TensorBoard: the network for one patch
                patch = planned(run.cfg.data.patch_size, "data.patch_size")
                graph(run.net, torch.zeros(1, run.model_info["in_channels"], *patch, device=run.device))
        return TrainState()
    ckpt = load_checkpoint(run.checkpoint_path)
    if len(ckpt["rng"]) != run.rank.world_size:
        raise TrainingError("RESUME_MISMATCH", f"checkpoint was written by {len(ckpt['rng'])} process(es), now "
                            f"{run.rank.world_size}")
    run.net.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"][run.rank.rank], run.augment, run.sampler_gen)
    state = TrainState.from_checkpoint(ckpt)
    if state.epoch + 1 > run.cfg.train.epochs:
        raise TrainingError("RESUME_NOTHING_TO_DO", f"the run already finished {state.epoch} epoch(s)",
                            f"extend it with --set train.epochs={state.epoch + 10} (or more)")
    log.info("resuming after epoch %d (best validation Dice %.3f at epoch %d)", state.epoch, state.best_metric,
             state.best_epoch)
    return state


def _params(run: _Run) -> dict[str, Any]:
    """What a new run logs as parameters: the shareable config, plan, dataset, device and versions."""
    cfg, pretrained, distiller = run.cfg, run.pretrained, run.distiller
    return {
        **flatten(config_to_dict(shareable(cfg))),
        "config_hash": config_hash(cfg),
        **{f"plan.{k}": v for k, v in json.loads(run.plan.to_json()).items() if k not in ("notes", "intensity")},
        "plan_hash": run.plan.hash(),
        "dataset.name": run.dataset.name,
        "dataset.hash": dataset_hash(run.dataset),
        "dataset.n_train": len(run.train_cases),
        "dataset.n_val": len(run.val_cases),
        "device": str(run.device),
        "world_size": run.rank.world_size,
        "git_commit": git_commit() or "unknown",
        **{f"version.{k}": v for k, v in versions().items()},
        **({f"pretrained.{k}": pretrained[k] for k in ("file", "sha256", "loaded", "total")} if pretrained else {}),
        **({"distill.teachers": len(distiller.members),
            "distill.teacher_sha256": ",".join(str(r["weights_sha256"])[:16] for r in distiller.records())}
           if distiller is not None else {}),
    }


def _epoch(run: _Run, state: TrainState, epoch: int, progress, bar) -> dict:
    """One epoch of optimisation steps, each over ``train.accumulate`` batches (under torchrun, gradients are
    synchronised on the last one only); returns its record (loss, learning rate, time, throughput).

    Raises:
        TrainingError: ``TRAIN_NONFINITE_LOSS`` naming epoch, step and cases (the best model is kept).
    """
    threads.refresh()  # another program may have started or ended: take the current CPU share
    run.model.train()
    accumulate = run.cfg.train.accumulate
    start, losses, pending = time.perf_counter(), [], []
    progress.update(bar, completed=0, description=f"epoch {epoch} iterations")
    for index, batch in enumerate(run.loader):
        last = index % accumulate == accumulate - 1
        if index % accumulate == 0:
            run.optimizer.zero_grad(set_to_none=True)
        with run.model.no_sync() if run.rank.enabled and not last else contextlib.nullcontext():
            loss = backward_step(run.model, run.loss_fn, run.scaler, batch, run.cfg, run.device, run.use_amp,
                                 run.amp_dtype, run.distiller, 1.0 / accumulate)
        if ddp.any_rank(not bool(torch.isfinite(loss)), run.rank):
            raise nonfinite_loss(f"epoch {epoch}, step {state.step}", batch["case_id"], f" (rank {run.rank.rank})")
        pending.append(loss.item())
        if not last:
            continue
        optimizer_step(run.model, run.optimizer, run.scaler, run.scheduler, run.cfg)
        losses.append(float(np.mean(pending)))
        pending = []
        state.step += 1
        progress.update(bar, advance=1, description=f"epoch {epoch} loss {losses[-1]:.3f}")
    return epoch_record(run, epoch, losses, time.perf_counter() - start)


def epoch_record(run: _Run, epoch: int, losses: list[float], elapsed: float) -> dict:
    """What an epoch logs and ``history.json`` keeps: mean training loss, learning rate, time and throughput (the
    Lightning module records its epochs with it too)."""
    return {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": run.optimizer.param_groups[0]["lr"],
            "epoch_time_s": elapsed, "samples_per_s": run.n_samples * run.rank.world_size / elapsed}


def nonfinite_loss(where: str, cases: list[str], rank: str = "") -> TrainingError:
    """``TRAIN_NONFINITE_LOSS`` naming where (epoch, step) and the batch's case IDs."""
    return TrainingError("TRAIN_NONFINITE_LOSS", f"loss is not finite at {where}; cases {', '.join(cases)}{rank}",
                         "lower train.lr or check those cases for extreme intensities; the best model was kept")


def _validate_and_keep_best(run: _Run, state: TrainState, record: dict) -> bool:
    """Validates on rank 0 when it is due, saves a better model folder as ``RUN/model``, tells the schedule the
    Dice (every rank: the ``plateau`` schedule's drops must agree); returns whether early stopping is due."""
    cfg, epoch = run.cfg, record["epoch"]
    if not (epoch % cfg.train.val_every == 0 or epoch == cfg.train.epochs):
        return False
    stop = _validate(run, state, record) if run.rank.is_main else False
    dice = record.get("val_dice_mean", float("nan"))
    if run.rank.enabled and cfg.train.schedule == "plateau":
        dice = ddp.from_main(dice, run.rank)
    after_validation(run.scheduler, dice)
    return stop


def _validate(run: _Run, state: TrainState, record: dict) -> bool:
    """Rank 0: Dice per label on the validation cases into ``record`` (the first case's overlay to trackers that
    show images), the best model folder kept; returns whether early stopping is due."""
    cfg, epoch = run.cfg, record["epoch"]
    fg_labels = sorted(k for k in run.dataset.labels if k != 0)
    show = getattr(run.tracker, "log_overlay", None)
    seen: dict = {}

    def keep_first(case_id: str, image, pred, ref, affine) -> None:
        seen.setdefault("case", (case_id, image, pred, ref, affine))

    scores = validate(run.net, run.validator, run.val_ds, fg_labels, on_case=keep_first if show else None)
    record.update({f"val_dice_{run.dataset.labels[lab]}": v for lab, v in scores.items()})
    record["val_dice_mean"] = float(np.nanmean(list(scores.values())))
    if show and seen:
        show(*seen["case"], run.dataset.labels, epoch)
    if record["val_dice_mean"] > state.best_metric:
        state.best_metric, state.best_epoch, state.stale = record["val_dice_mean"], epoch, 0
        save_model_dir(run.run_dir / "model", run.net, cfg, run.plan,
                       {**run.model_info, "epoch": epoch, "val_dice_mean": state.best_metric})
    else:
        state.stale += 1
    return cfg.train.early_stopping is not None and state.stale >= cfg.train.early_stopping


def _save(run: _Run, state: TrainState, record: dict, progress, bar) -> None:
    """The epoch's metrics to the tracker and the checkpoint (atomic) with every random state (rank 0 writes)."""
    rng_states = ddp.gather(capture_rng(run.augment, run.sampler_gen), run.rank)
    if not run.rank.is_main:
        return
    run.tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=state.epoch)
    save_checkpoint(run.checkpoint_path, {
        **state.to_checkpoint(), "model": run.net.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "rng": rng_states,
        "config_hash": config_hash(run.cfg),
    })
    write_json(run.checkpoint_path.with_name("last.json"), {"epoch": state.epoch, "step": state.step})
    val_text = f", val Dice {record['val_dice_mean']:.3f}" if "val_dice_mean" in record else ""
    log.info("epoch %d/%d: loss %.4f%s (%.1fs)", state.epoch, run.cfg.train.epochs, record["train_loss"], val_text,
             record["epoch_time_s"])
    progress.update(bar, advance=1, description=f"epoch {state.epoch} loss {record['train_loss']:.3f}{val_text}")


def _finish(run: _Run, state: TrainState) -> None:
    """Rank 0: the last epoch's model folder, the softmax temperature of both folders, history and curves, and
    the run's artifacts in the tracker; then every process leaves the process group."""
    cfg, run_dir, tracker = run.cfg, run.run_dir, run.tracker
    if run.rank.is_main:
        save_model_dir(run_dir / "model_last", run.net, cfg, run.plan,
                       {**run.model_info, "epoch": state.history[-1]["epoch"] if state.history else 0})
        if cfg.inference.qc.calibrate and len(run.val_ds):
            for folder in ("model", "model_last"):
                if (run_dir / folder).is_dir():
                    fitted = calibrate_model_dir(run_dir / folder, run.val_ds, run.device)
                    if folder == "model":
                        tracker.log_metrics({"qc_temperature": fitted["temperature"]})
        write_json(run_dir / "history.json", state.history)
        save_curves(state.history, run_dir / "training_curves.png")
        log.info("preprocessed cases: %d computed, %d read from the cache", run.cache.computed, run.cache.loaded)
        _log_artifacts(run, state)
    ddp.barrier(run.rank)
    ddp.shutdown(run.rank)


def _log_artifacts(run: _Run, state: TrainState) -> None:
    cfg, run_dir, tracker = run.cfg, run.run_dir, run.tracker
    with tempfile.TemporaryDirectory() as tmp:  # the logged config.yaml holds no path of this machine
        save_config(shareable(cfg), Path(tmp) / "config.yaml")
        tracker.log_artifact(Path(tmp) / "config.yaml")
    for name in ("plan.json", "fingerprint.json", "splits.json", "history.json", "training_curves.png", "pretrained.json"):
        if name != "pretrained.json" or (run_dir / name).is_file():
            tracker.log_artifact(run_dir / name)
    tracker.log_artifact(run_dir / "model", "model")
    tracker.log_artifact(run_dir / "model_last", "model_last")
    tracker.log_metrics({"best_val_dice_mean": state.best_metric, "best_epoch": state.best_epoch})
    if cfg.tracking.log_pyfunc and hasattr(tracker, "log_pyfunc_model"):
        tracker.log_pyfunc_model(run_dir / "model")
    if cfg.tracking.log_model and hasattr(tracker, "log_pytorch_model"):
        tracker.log_pytorch_model(run.net, int(run.val_ds[0][IMAGE].shape[0]), len(planned(cfg.data.spacing, "data.spacing")),
                                  int(np.prod(planned(cfg.model.strides, "model.strides"))), cfg.tracking)
