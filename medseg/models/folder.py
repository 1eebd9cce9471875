"""The self-describing model folder: everything inference needs, nothing else.

::

    MODEL_DIR/weights.pt   network state_dict (loaded with weights_only=True)
    MODEL_DIR/config.yaml  resolved run configuration (network, preprocessing, inference settings)
    MODEL_DIR/plan.json    the plan (spacing, patch, normalisation statistics)
    MODEL_DIR/model.json   labels, input channels, spatial dims, dataset, metric, versions, hashes
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.config import Config, config_hash, load_config, save_config, shareable
from medseg.errors import ModelError
from medseg.fsutil import atomic_torch_save, sha256_file, versions
from medseg.models.registry import build_model
from medseg.plan.planner import Plan

WEIGHTS, CONFIG, INFO, PLAN = "weights.pt", "config.yaml", "model.json", "plan.json"


def save_model_dir(path: Path, model: nn.Module, cfg: Config, plan: Plan, info: dict[str, Any]) -> Path:
    """Writes a model folder; the folder is assembled beside ``path`` and swapped in whole.

    Args:
        path: Destination folder (replaced if it exists).
        model: The network (its ``state_dict`` is saved, on CPU).
        cfg: The resolved configuration.
        plan: The run's plan.
        info: Must hold ``labels`` ({int: name}), ``spatial_dims`` and ``in_channels``; more is kept.
    """
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(state, tmp / WEIGHTS)
    save_config(shareable(cfg), tmp / CONFIG)  # no dataset path: the folder travels
    (tmp / PLAN).write_text(plan.to_json(), encoding="utf-8")
    full = {
        "format_version": 1,
        **info,
        "labels": {str(k): v for k, v in info["labels"].items()},
        "config_hash": config_hash(cfg),
        "plan_hash": plan.hash(),
        "weights_sha256": sha256_file(tmp / WEIGHTS),
        "versions": versions(),
    }
    (tmp / INFO).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


EXPORTED_FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
#: model.json key of an exported folder's network file hash (a PyTorch folder records ``weights_sha256``).
NETWORK_HASH = "network_sha256"


def _check_hash(file: Path, expected: str | None) -> None:
    """Raises ``MODEL_CORRUPT`` when ``file``'s SHA-256 is not the recorded one (folders without one pass)."""
    if expected and sha256_file(file) != expected:
        raise ModelError(
            "MODEL_CORRUPT", f"{file} is damaged or was replaced: its SHA-256 is not the one recorded in model.json",
            "restore the model folder from its original copy (or the MLflow artifact)",
        )


def load_model_dir(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module | None, Config, Plan, dict[str, Any]]:
    """Loads a model folder written by :func:`save_model_dir` or ``medseg export``.

    Returns:
        ``(model in eval mode on device, config, plan, info)``; ``info["labels"]`` has int keys. For an exported
        folder (``info["format"]`` ``onnx``/``torchscript``) the model is None: a backend runs its network file.

    Raises:
        ModelError: ``MODEL_NOT_FOUND`` (no such folder), ``MODEL_DIR_INVALID`` (files missing or unreadable),
            ``MODEL_CORRUPT`` (the network file or the plan is not the one recorded in model.json: its SHA-256
            differs), ``MODEL_WEIGHTS_MISMATCH`` (weights do not fit the configured network).
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError("MODEL_NOT_FOUND", f"model folder not found: {path}", "pass the folder written by `medseg train`")
    missing = [name for name in (CONFIG, PLAN, INFO) if not (path / name).is_file()]
    try:
        info = json.loads((path / INFO).read_text(encoding="utf-8")) if not missing else {}
    except (OSError, ValueError) as exc:
        raise ModelError("MODEL_DIR_INVALID", f"cannot read {path / INFO}: {exc}") from None
    network_file = EXPORTED_FILES.get(info.get("format", "pytorch"), WEIGHTS)
    missing += [network_file] if not (path / network_file).is_file() else []
    if missing:
        raise ModelError("MODEL_DIR_INVALID", f"{path} is not a model folder: missing {', '.join(missing)}")
    _check_hash(path / network_file, info.get(NETWORK_HASH if network_file != WEIGHTS else "weights_sha256"))
    try:
        info["labels"] = {int(k): v for k, v in info["labels"].items()}
        plan = Plan.from_json((path / PLAN).read_text(encoding="utf-8"))
        state = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True) if network_file == WEIGHTS else None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelError("MODEL_DIR_INVALID", f"cannot read model folder {path}: {exc}") from None
    if info.get("plan_hash") and plan.hash() != info["plan_hash"]:
        raise ModelError("MODEL_CORRUPT", f"{path / PLAN} is not the plan this model was trained with "
                         "(its hash differs from model.json)", "restore the model folder from its original copy")
    cfg = load_config(path / CONFIG)
    if state is None:
        return None, cfg, plan, info
    model = build_model(cfg.model, int(info["spatial_dims"]), int(info["in_channels"]), len(info["labels"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelError("MODEL_WEIGHTS_MISMATCH", f"{path}: weights do not fit the configured network: {first}") from None
    return model.to(device).eval(), cfg, plan, info
