"""The self-describing model folder: everything inference needs, nothing else.

::

    MODEL_DIR/weights.pt   network state_dict (loaded with weights_only=True)
    MODEL_DIR/config.yaml  resolved run configuration (network, preprocessing, inference settings)
    MODEL_DIR/plan.json    the plan (spacing, patch, normalisation statistics)
    MODEL_DIR/model.json   labels, input channels, spatial dims, dataset, metric, versions, hashes
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.config import Config, config_hash, load_config, save_config, shareable
from medseg.errors import ModelError, describe
from medseg.fsutil import atomic_torch_save, load_tensors, sha256_file, versions
from medseg.models.registry import build_model
from medseg.plan.planner import Plan

WEIGHTS, CONFIG, INFO, PLAN = "weights.pt", "config.yaml", "model.json", "plan.json"
#: model.json's hash of its own content (every other key: labels, channels, dims, hashes ...), so that an edited
#: label name or channel count is refused (``MODEL_CORRUPT``) instead of naming SEG segments and volumes wrongly.
INFO_HASH = "model_json_sha256"


def info_digest(info: dict[str, Any]) -> str:
    """SHA-256 of model.json's content without :data:`INFO_HASH` (canonical JSON: sorted keys, no spaces)."""
    body = {k: v for k, v in info.items() if k != INFO_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def write_info(path: Path, info: dict[str, Any]) -> Path:
    """Writes ``model.json`` (``path``) atomically with :data:`INFO_HASH` over the rest of it: every writer of a
    model.json (training, calibration, export) goes through here."""
    from medseg.fsutil import write_json

    body = {k: v for k, v in info.items() if k != INFO_HASH}
    return write_json(path, {**body, INFO_HASH: info_digest(body)})


def read_info(folder: Path) -> dict[str, Any]:
    """``model.json`` of a model folder, checked against its own hash (folders written before the hash pass).

    Raises:
        ModelError: ``MODEL_DIR_INVALID`` (unreadable, not a JSON object), ``MODEL_CORRUPT`` (edited).
    """
    from medseg.fsutil import read_json

    info = read_json(folder / INFO, "MODEL_DIR_INVALID", "model description", error=ModelError)
    if not isinstance(info, dict):
        raise ModelError("MODEL_DIR_INVALID", f"{INFO} of {folder.name} is not a JSON object")
    recorded = info.get(INFO_HASH)
    if recorded is not None and recorded != info_digest(info):
        raise ModelError("MODEL_CORRUPT", f"{INFO} of {folder.name} was changed after the model was saved (its "
                         "labels, channels or hashes differ from what was recorded)",
                         "restore the model folder from its original copy (or the MLflow artifact)")
    return info


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
    write_info(tmp / INFO, full)
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
            "MODEL_CORRUPT", f"{file.name} of {file.parent.name} is damaged or was replaced: its SHA-256 is not the one "
            "recorded in model.json",
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
    info = read_info(path) if not missing else {}
    network_file = EXPORTED_FILES.get(str(info.get("format", "pytorch")), WEIGHTS)
    missing += [network_file] if not (path / network_file).is_file() else []
    if missing:
        raise ModelError("MODEL_DIR_INVALID", f"{path.name} is not a model folder: missing {', '.join(missing)}")
    _check_hash(path / network_file, info.get(NETWORK_HASH if network_file != WEIGHTS else "weights_sha256"))
    try:
        info["labels"] = {int(k): str(v) for k, v in info["labels"].items()}
        int(info["spatial_dims"]), int(info["in_channels"])
        plan = Plan.from_json((path / PLAN).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError("MODEL_DIR_INVALID", f"cannot read model folder {path.name}: {describe(exc, path)}") from None
    state = load_tensors(path / WEIGHTS, "MODEL_DIR_INVALID", "model weights", ModelError) if network_file == WEIGHTS else None
    if info.get("plan_hash") and plan.hash() != info["plan_hash"]:
        raise ModelError("MODEL_CORRUPT", f"{path / PLAN} is not the plan this model was trained with "
                         "(its hash differs from model.json)", "restore the model folder from its original copy")
    cfg = load_config(path / CONFIG)
    if state is None:
        return None, cfg, plan, info
    model = build_model(cfg.model, int(info["spatial_dims"]), int(info["in_channels"]), len(info["labels"]))
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ModelError("MODEL_WEIGHTS_MISMATCH", f"{path.name}: weights do not fit the configured network: "
                         f"{describe(exc, path)}") from None
    return model.to(device).eval(), cfg, plan, info
