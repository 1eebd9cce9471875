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

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader
from monai.data.utils import worker_init_fn as monai_worker_init
from monai.utils import set_determinism
from torch import nn

from medseg import threads
from medseg.config import Config, config_hash, config_to_dict, flatten, save_config, shareable
from medseg.errors import ConfigError, TrainingError
from medseg.fsutil import git_commit, versions
from medseg.io.dataset import Case, Dataset, load_dataset
from medseg.losses import build_loss
from medseg.models import build_model
from medseg.models.folder import save_model_dir
from medseg.plan.fingerprint import Fingerprint, load_or_compute
from medseg.plan.planner import Plan, apply_plan, make_plan
from medseg.progress import progress_bar
from medseg.tracking import NullTracker, Tracker
from medseg.training import distributed as ddp
from medseg.training.checkpoint import LAST, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from medseg.training.components import (
    check_resolved,
    deep_supervision_loss,
    lr_factor,
    save_curves,
    select_device,
    split_cases,
    validate,
)
from medseg.training.data import CaseDataset, PreprocessedCache, preprocessing_spec
from medseg.training.distill import combined_loss
from medseg.transforms.pipeline import IMAGE, LABEL, build_augment_transforms, build_preprocess_transforms

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
    from medseg.models.registry import MEMORY_FACTOR, MODELS

    fingerprint = load_or_compute(dataset, run_dir / "fingerprint.json")
    builder = MODELS.get(cfg.model.name)
    levels = getattr(builder, "fixed_levels", None)
    hints = builder.plan_hints(cfg.model, fingerprint.dims) if hasattr(builder, "plan_hints") else {}
    plan = make_plan(fingerprint, cfg.plan.model_copy(update=hints), on_gpu=device.type == "cuda", fixed_levels=levels,
                     memory_factor=MEMORY_FACTOR.get(cfg.model.name, 1.0))
    if hints:
        plan.notes.append(f"{cfg.model.name} (size {cfg.model.size}): plan settings {hints}")
    if write:
        (run_dir / "plan.json").write_text(plan.to_json())
    return apply_plan(cfg, plan), plan


def _pretrained(net: nn.Module, cfg: Config, run_dir: Path, resume: bool, is_main: bool) -> dict | None:
    """Loads ``model.pretrained`` into ``net`` at the start of a run (a resumed run has it in its checkpoint);
    returns what ``RUN/pretrained.json`` records (file name, SHA-256, loaded/missing/unexpected tensors)."""
    record = run_dir / "pretrained.json"
    if resume or not cfg.model.pretrained:
        return json.loads(record.read_text()) if resume and record.is_file() else None
    from medseg.fsutil import sha256_file
    from medseg.models.pretrained import load_pretrained

    source = Path(cfg.model.pretrained)
    report = load_pretrained(net, source).to_dict()
    report["sha256"] = sha256_file(source / "weights.pt" if source.is_dir() else source)
    if is_main:
        record.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
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
    payload = json.dumps({"name": dataset.name, "labels": dataset.labels, "files": parts}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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


def _step(model, loss_fn, optimizer, scaler, scheduler, batch, cfg: Config, device, use_amp, amp_dtype,
          teachers=None) -> torch.Tensor:
    image = batch[IMAGE].as_tensor().to(device)  # (B, C, *patch)
    label = batch[LABEL].as_tensor().to(device)  # (B, 1, *patch)
    optimizer.zero_grad(set_to_none=True)
    try:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            output = model(image)
            loss = deep_supervision_loss(loss_fn, output, label, cfg.train.deep_supervision_decay)
            if teachers is not None:  # medseg distill: the frozen teachers' softened probabilities of this patch
                loss = combined_loss(loss, output, teachers.soft_targets(image), cfg.distill.temperature, cfg.distill.weight)
        if torch.isfinite(loss):
            scaler.scale(loss).backward()
            if cfg.train.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            "CUDA_OUT_OF_MEMORY",
            f"GPU out of memory with patch {list(cfg.data.patch_size)} and batch size {cfg.train.batch_size}",
            "lower data.patch_size or train.batch_size (or plan.gpu_memory_gb and let the plan choose)",
        ) from None
    return loss.detach()


def _init_worker(worker_id: int) -> None:
    """DataLoader workers: one thread each (they share the process's CPUs), then MONAI's transform seeding."""
    threads.limit_worker()
    monai_worker_init(worker_id)


def fit(
    cfg: Config,
    run_dir: str | Path,
    tracker: Tracker | None = None,
    show_progress: bool = True,
    resume: bool = False,
    split: tuple[list[str], list[str]] | None = None,
    teachers: list[Path] | None = None,
) -> FitResult:
    """Trains a model as configured and writes the run folder.

    Args:
        cfg: The configuration; ``data.dataset`` must name an MSD dataset folder.
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
    run_dir = Path(run_dir)
    if cfg.data.dataset is None:
        raise ConfigError("CONFIG_MISSING_KEY", "data.dataset is not set", "use --set data.dataset=PATH")
    dataset = load_dataset(cfg.data.dataset)
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
    labels = sorted(dataset.labels)
    fg_labels = [lab for lab in labels if lab != 0]
    set_determinism(seed=cfg.seed + rank.rank)
    if rank.is_main:
        save_config(cfg, run_dir / "config.yaml")
        splits = {"seed": cfg.seed, "train": [c.id for c in train_cases], "val": [c.id for c in val_cases]}
        (run_dir / "splits.json").write_text(json.dumps(splits, indent=2))

    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "cache"
    cache = PreprocessedCache(build_preprocess_transforms(cfg, plan), cfg.data.cache, cache_dir, preprocessing_spec(cfg, plan))
    augment = build_augment_transforms(cfg)
    train_ds, val_ds = CaseDataset(_items(train_cases), cache, augment), CaseDataset(_items(val_cases), cache)
    sampler_gen = torch.Generator().manual_seed(cfg.seed + rank.rank)
    n_samples = cfg.train.iterations_per_epoch * cfg.train.batch_size
    sampler = torch.utils.data.RandomSampler(train_ds, replacement=True, num_samples=n_samples, generator=sampler_gen)
    loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                        worker_init_fn=_init_worker)

    in_channels = int(val_ds[0][IMAGE].shape[0])
    spatial_dims = len(cfg.data.spacing)
    if distiller is not None:
        distiller.check_student(cfg, plan, dataset.labels, spatial_dims, in_channels)
        if rank.is_main and not resume:
            distiller.save(run_dir)
    net = build_model(cfg.model, spatial_dims, in_channels, len(labels)).to(device)
    pretrained = _pretrained(net, cfg, run_dir, resume, rank.is_main)
    model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) if rank.enabled else net
    loss_fn = build_loss(cfg.loss)
    if cfg.train.optimizer == "adamw":
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum, nesterov=True, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    use_amp = cfg.train.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    history: list[dict] = []
    best, best_epoch, step, start_epoch, stale = -1.0, 0, 0, 1, 0
    checkpoint_path = run_dir / "checkpoints" / LAST
    if resume:
        ckpt = load_checkpoint(checkpoint_path)
        if len(ckpt["rng"]) != rank.world_size:
            raise TrainingError("RESUME_MISMATCH", f"checkpoint was written by {len(ckpt['rng'])} process(es), now {rank.world_size}")
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"][rank.rank], augment, sampler_gen)
        best, best_epoch, step, stale = ckpt["best_metric"], ckpt["best_epoch"], ckpt["step"], ckpt["stale"]
        history, start_epoch = list(ckpt["history"]), ckpt["epoch"] + 1
        if start_epoch > cfg.train.epochs:
            raise TrainingError(
                "RESUME_NOTHING_TO_DO", f"the run already finished {ckpt['epoch']} epoch(s)",
                f"extend it with --set train.epochs={ckpt['epoch'] + 10} (or more)",
            )
        log.info("resuming after epoch %d (best validation Dice %.3f at epoch %d)", ckpt["epoch"], best, best_epoch)
    elif rank.is_main:
        tracker.log_params({
            **flatten(config_to_dict(shareable(cfg))),
            "config_hash": config_hash(cfg),
            **{f"plan.{k}": v for k, v in json.loads(plan.to_json()).items() if k not in ("notes", "intensity")},
            "plan_hash": plan.hash(),
            "dataset.name": dataset.name,
            "dataset.hash": dataset_hash(dataset),
            "dataset.n_train": len(train_cases),
            "dataset.n_val": len(val_cases),
            "device": str(device),
            "world_size": rank.world_size,
            "git_commit": git_commit() or "unknown",
            **{f"version.{k}": v for k, v in versions().items()},
            **({f"pretrained.{k}": pretrained[k] for k in ("file", "sha256", "loaded", "total")} if pretrained else {}),
            **({"distill.teachers": len(distiller.members),
                "distill.teacher_sha256": ",".join(str(r["weights_sha256"])[:16] for r in distiller.records())}
               if distiller is not None else {}),
        })

    model_info = {"labels": dataset.labels, "spatial_dims": spatial_dims, "in_channels": in_channels,
                  "modality": dataset.modality, "dataset": dataset.name, "qc": _qc_reference(run_dir),
                  **({"pretrained": {k: pretrained[k] for k in ("file", "sha256", "loaded", "total")}} if pretrained else {}),
                  **({"teachers": distiller.records(), "distill": cfg.distill.model_dump()} if distiller is not None else {})}
    from medseg.inference.predictor import Predictor

    validator = Predictor.for_network(net, cfg, plan, model_info, device)  # what validation predicts with
    stopped_early = False
    with progress_bar(show_progress and rank.is_main) as progress:
        task = progress.add_task("training", total=cfg.train.epochs, completed=start_epoch - 1)
        iterations = progress.add_task("iterations", total=cfg.train.iterations_per_epoch)
        for epoch in range(start_epoch, cfg.train.epochs + 1):
            threads.refresh()  # another medseg process may have started or ended: take the current CPU share
            model.train()
            start, losses = time.perf_counter(), []
            progress.update(iterations, completed=0, description=f"epoch {epoch} iterations")
            for batch in loader:
                loss = _step(model, loss_fn, optimizer, scaler, scheduler, batch, cfg, device, use_amp, amp_dtype, distiller)
                if ddp.any_rank(not bool(torch.isfinite(loss)), rank):
                    raise TrainingError(
                        "TRAIN_NONFINITE_LOSS",
                        f"loss is not finite at epoch {epoch}, step {step}; cases {', '.join(batch['case_id'])} (rank {rank.rank})",
                        "lower train.lr or check those cases for extreme intensities; the best model was kept",
                    )
                losses.append(loss.item())
                step += 1
                progress.update(iterations, advance=1, description=f"epoch {epoch} loss {losses[-1]:.3f}")
            elapsed = time.perf_counter() - start
            record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"],
                      "epoch_time_s": elapsed, "samples_per_s": n_samples * rank.world_size / elapsed}
            stop = False
            if rank.is_main and (epoch % cfg.train.val_every == 0 or epoch == cfg.train.epochs):
                scores = validate(net, validator, val_ds, fg_labels)
                record.update({f"val_dice_{dataset.labels[lab]}": v for lab, v in scores.items()})
                record["val_dice_mean"] = float(np.nanmean(list(scores.values())))
                if record["val_dice_mean"] > best:
                    best, best_epoch, stale = record["val_dice_mean"], epoch, 0
                    save_model_dir(run_dir / "model", net, cfg, plan, {**model_info, "epoch": epoch, "val_dice_mean": best})
                else:
                    stale += 1
                stop = cfg.train.early_stopping is not None and stale >= cfg.train.early_stopping
            history.append(record)
            rng_states = ddp.gather(capture_rng(augment, sampler_gen), rank)
            if rank.is_main:
                tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
                save_checkpoint(checkpoint_path, {
                    "epoch": epoch, "step": step, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "best_metric": best,
                    "best_epoch": best_epoch, "stale": stale, "history": history, "rng": rng_states,
                    "config_hash": config_hash(cfg),
                })
                (run_dir / "checkpoints" / "last.json").write_text(json.dumps({"epoch": epoch, "step": step}))
                val_text = f", val Dice {record['val_dice_mean']:.3f}" if "val_dice_mean" in record else ""
                log.info("epoch %d/%d: loss %.4f%s (%.1fs)", epoch, cfg.train.epochs, record["train_loss"], val_text, elapsed)
                progress.update(task, advance=1, description=f"epoch {epoch} loss {record['train_loss']:.3f}{val_text}")
            if ddp.any_rank(stop, rank):
                log.info("early stopping: no validation improvement in %d validations", cfg.train.early_stopping)
                stopped_early = True
                break

    if rank.is_main:
        save_model_dir(run_dir / "model_last", net, cfg, plan, {**model_info, "epoch": history[-1]["epoch"] if history else 0})
        if cfg.inference.qc.calibrate and len(val_ds):
            for folder in ("model", "model_last"):
                if (run_dir / folder).is_dir():
                    fitted = calibrate_model_dir(run_dir / folder, val_ds, device)
                    if folder == "model":
                        tracker.log_metrics({"qc_temperature": fitted["temperature"]})
        (run_dir / "history.json").write_text(json.dumps(history, indent=2))
        save_curves(history, run_dir / "training_curves.png")
        log.info("preprocessed cases: %d computed, %d read from the cache", cache.computed, cache.loaded)
        with tempfile.TemporaryDirectory() as tmp:  # the logged config.yaml holds no path of this machine
            save_config(shareable(cfg), Path(tmp) / "config.yaml")
            tracker.log_artifact(Path(tmp) / "config.yaml")
        for name in ("plan.json", "fingerprint.json", "splits.json", "history.json", "training_curves.png", "pretrained.json"):
            if name != "pretrained.json" or (run_dir / name).is_file():
                tracker.log_artifact(run_dir / name)
        tracker.log_artifact(run_dir / "model", "model")
        tracker.log_artifact(run_dir / "model_last", "model_last")
        tracker.log_metrics({"best_val_dice_mean": best, "best_epoch": best_epoch})
        if cfg.tracking.log_model and hasattr(tracker, "log_pytorch_model"):
            tracker.log_pytorch_model(net, in_channels, spatial_dims, int(np.prod(cfg.model.strides)), cfg.tracking)
    ddp.barrier(rank)
    ddp.shutdown(rank)
    return FitResult(run_dir, run_dir / "model", best, best_epoch, history, stopped_early, rank.is_main)
