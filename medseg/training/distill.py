"""Knowledge distillation of one or more trained models (an ensemble, e.g. the five folds of a cross-validation)
into one student network: ``medseg distill -m TEACHER [-m TEACHER ...] -c STUDENT_CONFIG -o RUN``.

The student trains as ``medseg train`` trains (same loop, tracking, checkpoints, resume, model folder); on every
training patch the teachers, frozen in eval mode, predict the same augmented patch and the loss becomes

    (1 - w) * hard_loss(student, reference label) + w * T^2 * KL(mean_t softmax(teacher_t / T) || softmax(student / T))

(Hinton et al., "Distilling the Knowledge in a Neural Network", 2015: temperature ``T``, the ``T^2`` keeps the
gradient scale independent of ``T``; averaging the members' softened probabilities is the ensemble's own
prediction). ``w`` is ``distill.weight`` and ``T`` ``distill.temperature``. The hard loss is the student's
``loss`` section (Dice + CE/focal), with deep supervision when the student has it; the soft term applies to the
final output.

The teachers read the student's patch, so the student's preprocessing (spacing, intensity normalisation and its
statistics, CLAHE) must be the teachers'; a student config that leaves ``data.spacing`` null takes the teachers'.
Anything else that differs is refused (``DISTILL_TEACHER_MISMATCH``) rather than distilled from wrong inputs. The
student's own network (``model``), patch and batch are free.

``RUN/teachers.json`` records each teacher's folder path (on this machine, for ``--resume``) and weights hash; the
model folder's ``model.json`` records the teachers without paths (network, weights SHA-256, validation Dice).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.config import Config
from medseg.errors import ConfigError, TrainingError
from medseg.fsutil import read_json, write_json
from medseg.plan.planner import Plan
from medseg.transforms.pipeline import config_identity, preprocessing_identity

TEACHERS_FILE = "teachers.json"


def _refuse_difference(mine: dict, theirs: dict) -> None:
    differ = sorted(k for k in mine if mine[k] != theirs[k])
    if differ:
        detail = "; ".join(f"{k}: student {mine[k]} vs teachers {theirs[k]}" for k in differ)
        raise ConfigError("DISTILL_TEACHER_MISMATCH", f"the student's preprocessing is not the teachers' ({detail})",
                          "leave data.spacing and data.intensity as the teachers had them (null spacing takes theirs)")


def student_config(teacher_dirs: list[Path], cfg: Config, teacher_cfg: Config | None = None) -> Config:
    """Before anything of the run is written: the student config with the teachers' spacing where it left it null,
    refused when its configured preprocessing is not the teachers'. The teachers' config is ``teacher_cfg`` when
    they are loaded already, else read from the first folder's ``config.yaml`` (nothing else is read).

    Raises:
        ModelError: ``MODEL_NOT_FOUND`` / ``MODEL_DIR_INVALID`` for a folder that is not a model folder.
        ConfigError: ``DISTILL_TEACHER_MISMATCH``.
    """
    if teacher_cfg is None:
        from medseg.config import load_config
        from medseg.errors import ModelError
        from medseg.models.folder import CONFIG

        for path in map(Path, teacher_dirs):
            if not (path / CONFIG).is_file():
                raise ModelError("MODEL_NOT_FOUND" if not path.is_dir() else "MODEL_DIR_INVALID",
                                 f"teacher {path.name} is not a model folder (no {CONFIG})", "pass the folder written by `medseg train`")
        teacher_cfg = load_config(Path(teacher_dirs[0]) / CONFIG)
    if cfg.data.spacing is None and teacher_cfg.data.spacing is not None:
        data = cfg.data.model_copy(update={"spacing": tuple(teacher_cfg.data.spacing)})
        cfg = Config.model_validate(cfg.model_copy(update={"data": data}).model_dump())
    _refuse_difference(config_identity(cfg), config_identity(teacher_cfg))
    return cfg


@dataclass
class Teacher:
    """One frozen teacher network and what identifies it."""

    net: nn.Module
    cfg: Config
    plan: Plan
    info: dict
    path: Path

    @property
    def divisor(self) -> int:
        return int(np.prod(self.cfg.model.strides or (1,)))

    def record(self) -> dict:
        """What the student's model folder keeps of this teacher (no path: the folder travels)."""
        return {"model": self.cfg.model.name, "weights_sha256": self.info.get("weights_sha256"),
                "val_dice_mean": self.info.get("val_dice_mean"), "dataset": self.info.get("dataset")}


class Teachers:
    """The frozen teacher ensemble: averaged temperature-softened probabilities of a batch of patches."""

    def __init__(self, teachers: list[Teacher], temperature: float) -> None:
        self.members, self.temperature = teachers, temperature

    @classmethod
    def load(cls, paths: list[Path], device: torch.device, temperature: float) -> Teachers:
        """Loads PyTorch model folders, frozen, on ``device`` (an exported ONNX/TorchScript folder cannot teach: the
        teachers run in PyTorch on the training device, beside the student).

        Raises:
            ModelError: a folder that is not a model folder (``MODEL_NOT_FOUND``, ``MODEL_DIR_INVALID``, ...).
            ConfigError: ``DISTILL_TEACHER_MISMATCH`` for an exported folder or teachers that disagree on labels,
                dimensions or input channels.
        """
        from medseg.models.folder import load_model_dir

        if not paths:
            raise ConfigError("CONFIG_MISSING_KEY", "distillation needs at least one teacher", "pass -m MODEL_DIR (repeat for an ensemble)")
        members = []
        for path in paths:
            net, cfg, plan, info = load_model_dir(path, device)
            if net is None:
                raise ConfigError("DISTILL_TEACHER_MISMATCH", f"teacher {Path(path).name} is an exported ({info.get('format')}) folder",
                                  "pass the PyTorch model folder written by `medseg train`")
            for p in net.parameters():
                p.requires_grad_(False)
            members.append(Teacher(net.eval(), cfg, plan, info, Path(path)))
        first = members[0]
        for t in members[1:]:
            for key in ("labels", "spatial_dims", "in_channels"):
                if t.info.get(key) != first.info.get(key):
                    raise ConfigError("DISTILL_TEACHER_MISMATCH", f"teachers differ in {key}: {first.info.get(key)} vs {t.info.get(key)}",
                                      "distil models trained on the same task")
            if preprocessing_identity(t.cfg, t.plan) != preprocessing_identity(first.cfg, first.plan):
                raise ConfigError("DISTILL_TEACHER_MISMATCH", "teachers differ in preprocessing (spacing or normalisation)",
                                  "distil models trained with the same data settings")
        return cls(members, temperature)

    def check_student(self, cfg: Config, plan: Plan, labels: dict, spatial_dims: int, in_channels: int) -> None:
        """Refuses a student whose task or preprocessing is not the teachers'.

        Raises:
            ConfigError: ``DISTILL_TEACHER_MISMATCH`` naming what differs.
        """
        first = self.members[0]
        theirs = {int(k): v for k, v in first.info["labels"].items()}
        if {int(k): v for k, v in labels.items()} != theirs:
            raise ConfigError("DISTILL_TEACHER_MISMATCH", f"the dataset's labels {labels} are not the teachers' {theirs}")
        if spatial_dims != first.info["spatial_dims"] or in_channels != first.info["in_channels"]:
            raise ConfigError("DISTILL_TEACHER_MISMATCH", f"the student is {spatial_dims}D with {in_channels} channel(s), the "
                              f"teachers {first.info['spatial_dims']}D with {first.info['in_channels']}")
        _refuse_difference(preprocessing_identity(cfg, plan), preprocessing_identity(first.cfg, first.plan))

    @torch.no_grad()
    def soft_targets(self, image: torch.Tensor) -> torch.Tensor:
        """Mean over teachers of ``softmax(logits / T)`` for ``image`` ``(B, C, *patch)``; padded (edge values) to each
        teacher's divisor and cropped back."""
        total: Any = None
        for t in self.members:
            pad = [(-s) % t.divisor for s in image.shape[2:]]
            x = image
            if any(pad):
                flat = [v for p in reversed(pad) for v in (0, p)]
                x = F.pad(image, flat, mode="replicate")
            logits = t.net(x)
            if isinstance(logits, (list, tuple)):
                logits = logits[-1]
            logits = logits[(slice(None), slice(None), *[slice(0, s) for s in image.shape[2:]])].float()
            probs = torch.softmax(logits / self.temperature, dim=1)
            total = probs if total is None else total + probs
        return total / len(self.members)

    def records(self) -> list[dict]:
        return [t.record() for t in self.members]

    def save(self, run_dir: Path) -> None:
        """``RUN/teachers.json``: paths (for --resume on this machine) and weights hashes."""
        payload = [{"path": str(t.path.resolve()), **t.record()} for t in self.members]
        write_json(run_dir / TEACHERS_FILE, {"temperature": self.temperature, "teachers": payload})


def saved_teacher_paths(run_dir: Path) -> list[Path]:
    """The teacher folders of a distillation run (``RUN/teachers.json``), for ``--resume``.

    Raises:
        TrainingError: ``CHECKPOINT_NOT_FOUND`` when the run has no teachers.json.
    """
    record = run_dir / TEACHERS_FILE
    if not record.is_file():
        raise TrainingError("CHECKPOINT_NOT_FOUND", f"{run_dir.name} has no {TEACHERS_FILE}: not a distillation run",
                            "resume a training run with `medseg train --resume`")
    return [Path(t["path"]) for t in read_json(record, "CHECKPOINT_UNREADABLE", "teachers record")["teachers"]]


def check_same_teachers(teachers: Teachers, run_dir: Path) -> None:
    """On resume: the teachers must be the ones the run started with (same weights).

    Raises:
        TrainingError: ``RESUME_MISMATCH``.
    """
    saved = read_json(run_dir / TEACHERS_FILE, "CHECKPOINT_UNREADABLE", "teachers record")["teachers"]
    if [t["weights_sha256"] for t in saved] != [r["weights_sha256"] for r in teachers.records()]:
        raise TrainingError("RESUME_MISMATCH", "the teachers are not the ones this distillation run started with",
                            "resume with the same -m folders (or none: the run's teachers.json names them)")


def distillation_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(soft_targets || softmax(student / T))``, averaged over voxels (the batch mean of per-voxel KL)."""
    log_student = torch.log_softmax(student_logits.float() / temperature, dim=1)
    target = soft_targets.clamp_min(1e-8)
    kl = (target * (target.log() - log_student)).sum(dim=1)  # (B, *patch)
    return kl.mean() * temperature**2


def combined_loss(hard: torch.Tensor, student_out, soft_targets: torch.Tensor, temperature: float, weight: float) -> torch.Tensor:
    """``(1 - weight) * hard + weight * distillation`` on the final output of ``student_out`` (a tensor or the
    deep-supervision list, final last)."""
    final = student_out[-1] if isinstance(student_out, (list, tuple)) else student_out
    soft = distillation_loss(final, soft_targets, temperature)
    return (1 - weight) * hard + weight * soft
