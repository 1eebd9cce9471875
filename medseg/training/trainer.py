"""The training loop: ``fit(cfg, run_dir)`` -> a model folder, a checkpoint and one tracked run.

Run folder layout::

    RUN/config.yaml            resolved configuration (plan-derived values filled in)
    RUN/fingerprint.json, RUN/plan.json   dataset fingerprint and the plan made from it
    RUN/cache/                 preprocessed cases (data.cache: disk; data.cache_dir moves it)
    RUN/splits.json            train/validation case IDs
    RUN/model/                 best model folder (see medseg.models.folder)
    RUN/checkpoints/last.pt    model, optimizer, scheduler, epoch, best metric (atomic)
    RUN/history.json, RUN/training_curves.png
    RUN/mlflow.db, RUN/mlartifacts/   embedded MLflow store (unless tracking.uri points elsewhere)
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader
from monai.inferers import sliding_window_inference
from monai.utils import set_determinism
from torch import nn

from medseg.config import Config, config_hash, config_to_dict, flatten, save_config
from medseg.errors import ConfigError, TrainingError
from medseg.fsutil import atomic_torch_save, git_commit, versions
from medseg.io.dataset import Case, load_dataset
from medseg.losses import build_loss
from medseg.metrics.overlap import per_label_dice
from medseg.models import build_model
from medseg.models.folder import save_model_dir
from medseg.tracking import NullTracker, Tracker
from medseg.plan.fingerprint import load_or_compute
from medseg.plan.planner import Plan, apply_plan, make_plan
from medseg.training.data import CaseDataset, PreprocessedCache, preprocessing_spec
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
        raise ConfigError("DEVICE_UNAVAILABLE", "train.device is cuda but no CUDA GPU is visible", "use device: auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("DEVICE_UNAVAILABLE", "train.device is mps but MPS is not available", "use device: auto or cpu")
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


def _lr_lambda(cfg: Config):
    warmup = cfg.train.warmup_epochs * cfg.train.iterations_per_epoch
    total = cfg.train.epochs * cfg.train.iterations_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _items(cases: list[Case]) -> list[dict]:
    return [{IMAGE: str(c.image), LABEL: str(c.label), "case_id": c.id} for c in cases]


def _check_patch(cfg: Config) -> None:
    for key, value in (("data.spacing", cfg.data.spacing), ("data.patch_size", cfg.data.patch_size),
                       ("model.channels", cfg.model.channels), ("model.strides", cfg.model.strides),
                       ("train.batch_size", cfg.train.batch_size)):
        if value is None:
            raise ConfigError("CONFIG_MISSING_KEY", f"{key} is null after planning", "set it, or leave both model.channels and model.strides null")
    if len(cfg.data.patch_size) != len(cfg.data.spacing):
        raise ConfigError("CONFIG_INVALID_VALUE", "data.patch_size and data.spacing must have the same length")
    divisor = int(np.prod(cfg.model.strides))
    bad = [p for p in cfg.data.patch_size if p % divisor]
    if bad:
        raise ConfigError(
            "CONFIG_INVALID_VALUE",
            f"data.patch_size {list(cfg.data.patch_size)} must be divisible by {divisor} (product of model.strides)",
        )


def plan_run(cfg: Config, dataset, run_dir: Path, device: torch.device) -> tuple[Config, Plan]:
    """Fingerprints the dataset (``RUN/fingerprint.json``), plans, fills unpinned config values, saves ``plan.json``."""
    from medseg.models.registry import MODELS

    fingerprint = load_or_compute(dataset, run_dir / "fingerprint.json")
    levels = getattr(MODELS.get(cfg.model.name), "fixed_levels", None)
    plan = make_plan(fingerprint, cfg.plan, on_gpu=device.type == "cuda", fixed_levels=levels)
    (run_dir / "plan.json").write_text(plan.to_json())
    return apply_plan(cfg, plan), plan


def final_output(output: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The full-resolution prediction of a network that may return deep-supervision outputs."""
    return output[-1] if isinstance(output, (list, tuple)) else output


def deep_supervision_loss(loss_fn: nn.Module, output: torch.Tensor | list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
    """Loss of one output, or the weighted mean over deep-supervision outputs (weights halve from the final one)."""
    if not isinstance(output, (list, tuple)):
        return loss_fn(output, label)
    weights = [0.5 ** (len(output) - 1 - i) for i in range(len(output))]
    return sum(w * loss_fn(o, label) for w, o in zip(weights, output)) / sum(weights)


@torch.no_grad()
def validate(model: nn.Module, val_ds: CaseDataset, cfg: Config, labels: list[int], device: torch.device) -> dict[int, float]:
    """Sliding-window prediction of each validation case on the preprocessed grid; mean Dice per label."""
    model.eval()
    scores: dict[int, list[float]] = {lab: [] for lab in labels}
    for item in val_ds:
        image = item[IMAGE].as_tensor()[None].to(device)  # (1, C, X, Y, Z)
        logits = sliding_window_inference(
            image,
            roi_size=cfg.data.patch_size,
            sw_batch_size=cfg.inference.sw_batch_size,
            predictor=lambda x: final_output(model(x)),
            overlap=cfg.inference.overlap,
            mode=cfg.inference.blend,
        )
        pred = logits.argmax(1)[0].cpu().numpy()  # (X, Y[, Z])
        ref = item[LABEL].as_tensor()[0].cpu().numpy().round().astype(np.int64)
        for lab, value in per_label_dice(pred, ref, labels).items():
            scores[lab].append(value)
    model.train()
    return {lab: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan") for lab, v in scores.items()}


def _save_curves(history: list[dict], path: Path) -> None:
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


def fit(cfg: Config, run_dir: str | Path, tracker: Tracker | None = None, show_progress: bool = True) -> FitResult:
    """Trains a model as configured and writes the run folder.

    Args:
        cfg: The resolved configuration; ``data.dataset`` must name an MSD dataset folder.
        run_dir: Output folder for the run.
        tracker: Where params, per-epoch metrics and artifacts go (default: nothing is tracked).
        show_progress: Show a live progress bar when the output is a terminal.

    Returns:
        A :class:`FitResult` naming the best model folder and its validation Dice.

    Raises:
        ConfigError: Bad settings (``DATASET_TOO_SMALL``, ``DEVICE_UNAVAILABLE``, ...).
        TrainingError: ``TRAIN_NONFINITE_LOSS`` with the epoch, step and case IDs of the bad batch.
    """
    run_dir = Path(run_dir)
    tracker = tracker or NullTracker()
    if cfg.data.dataset is None:
        raise ConfigError("CONFIG_MISSING_KEY", "data.dataset is not set", "use --set data.dataset=PATH")
    dataset = load_dataset(cfg.data.dataset)
    device = select_device(cfg.train.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg, plan = plan_run(cfg, dataset, run_dir, device)
    _check_patch(cfg)
    train_cases, val_cases = split_cases(dataset.training, cfg.data.val_fraction, cfg.seed)
    labels = sorted(dataset.labels)
    fg_labels = [lab for lab in labels if lab != 0]
    set_determinism(seed=cfg.seed)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "splits.json").write_text(
        json.dumps({"seed": cfg.seed, "train": [c.id for c in train_cases], "val": [c.id for c in val_cases]}, indent=2)
    )
    tracker.log_params(
        {
            **flatten(config_to_dict(cfg)),
            "config_hash": config_hash(cfg),
            "plan_hash": plan.hash(),
            "dataset.name": dataset.name,
            "dataset.n_train": len(train_cases),
            "dataset.n_val": len(val_cases),
            "device": str(device),
            "git_commit": git_commit() or "unknown",
            **{f"version.{k}": v for k, v in versions().items()},
        }
    )

    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "cache"
    cache = PreprocessedCache(build_preprocess_transforms(cfg, plan), cfg.data.cache, cache_dir, preprocessing_spec(cfg, plan))
    train_ds = CaseDataset(_items(train_cases), cache, build_augment_transforms(cfg))
    val_ds = CaseDataset(_items(val_cases), cache)
    sampler_gen = torch.Generator().manual_seed(cfg.seed)
    n_samples = cfg.train.iterations_per_epoch * cfg.train.batch_size
    sampler = torch.utils.data.RandomSampler(train_ds, replacement=True, num_samples=n_samples, generator=sampler_gen)
    loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.data.num_workers)

    in_channels = int(val_ds[0][IMAGE].shape[0])
    spatial_dims = len(cfg.data.spacing)
    model = build_model(cfg.model, spatial_dims, in_channels, len(labels)).to(device)
    loss_fn = build_loss(cfg.loss)
    if cfg.train.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.train.lr, momentum=0.99, nesterov=True, weight_decay=cfg.train.weight_decay
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    use_amp = cfg.train.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    model_info = {
        "labels": dataset.labels,
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "modality": dataset.modality,
        "dataset": dataset.name,
    }
    model_dir = run_dir / "model"
    history: list[dict] = []
    best, best_epoch, step = -1.0, 0, 0
    from medseg.progress import progress_bar

    with progress_bar(show_progress) as progress:
        task = progress.add_task("training", total=cfg.train.epochs)
        for epoch in range(1, cfg.train.epochs + 1):
            model.train()
            start, losses = time.perf_counter(), []
            for batch in loader:
                image = batch[IMAGE].as_tensor().to(device)  # (B, C, *patch)
                label = batch[LABEL].as_tensor().to(device)  # (B, 1, *patch)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    loss = deep_supervision_loss(loss_fn, model(image), label)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        "TRAIN_NONFINITE_LOSS",
                        f"loss is {loss.item()} at epoch {epoch}, step {step}; cases {', '.join(batch['case_id'])}",
                        "lower train.lr or check those cases for extreme intensities; the best model was kept",
                    )
                scaler.scale(loss).backward()
                if cfg.train.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                losses.append(loss.item())
                step += 1
            elapsed = time.perf_counter() - start
            record = {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "lr": optimizer.param_groups[0]["lr"],
                "epoch_time_s": elapsed,
                "samples_per_s": n_samples / elapsed,
            }
            if epoch % cfg.train.val_every == 0 or epoch == cfg.train.epochs:
                scores = validate(model, val_ds, cfg, fg_labels, device)
                record.update({f"val_dice_{dataset.labels[lab]}": v for lab, v in scores.items()})
                record["val_dice_mean"] = float(np.nanmean(list(scores.values())))
                if record["val_dice_mean"] > best:
                    best, best_epoch = record["val_dice_mean"], epoch
                    save_model_dir(model_dir, model, cfg, plan, {**model_info, "epoch": epoch, "val_dice_mean": best})
            history.append(record)
            tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
            atomic_torch_save(
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "best_metric": best,
                },
                run_dir / "checkpoints" / "last.pt",
            )
            val_text = f", val Dice {record['val_dice_mean']:.3f}" if "val_dice_mean" in record else ""
            log.info("epoch %d/%d: loss %.4f%s (%.1fs)", epoch, cfg.train.epochs, record["train_loss"], val_text, elapsed)
            progress.update(task, advance=1, description=f"epoch {epoch} loss {record['train_loss']:.3f}{val_text}")

    (run_dir / "history.json").write_text(json.dumps(history, indent=2))
    _save_curves(history, run_dir / "training_curves.png")
    log.info("preprocessed cases: %d computed, %d read from the cache", cache.computed, cache.loaded)
    for name in ("config.yaml", "plan.json", "fingerprint.json", "splits.json", "history.json", "training_curves.png"):
        tracker.log_artifact(run_dir / name)
    tracker.log_artifact(model_dir, "model")
    tracker.log_metrics({"best_val_dice_mean": best, "best_epoch": best_epoch})
    return FitResult(run_dir, model_dir, best, best_epoch, history)
