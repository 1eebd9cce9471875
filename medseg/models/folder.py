"""The self-describing model folder: everything inference needs, nothing else.

::

    MODEL_DIR/weights.pt   network state_dict (loaded with weights_only=True)
    MODEL_DIR/config.yaml  resolved run configuration (network, preprocessing, inference settings)
    MODEL_DIR/plan.json    the plan (spacing, patch, normalisation statistics)
    MODEL_DIR/model.json   labels, input channels, spatial dims, dataset, metric, versions, hashes
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.config import Config, config_hash, load_config, save_config, shareable
from medseg.errors import ModelError, describe
from medseg.fsutil import atomic_torch_save, json_hash, load_tensors, sha256_file, versions, write_text
from medseg.models.registry import build_model
from medseg.plan.planner import Plan

WEIGHTS, CONFIG, INFO, PLAN = "weights.pt", "config.yaml", "model.json", "plan.json"
#: model.json's hash of its own content (every other key: labels, channels, dims, hashes ...), so that an edited
#: label name or channel count is refused (``MODEL_CORRUPT``) instead of naming SEG segments and volumes wrongly.
INFO_HASH = "model_json_sha256"


def info_digest(info: dict[str, Any]) -> str:
    """SHA-256 of model.json's content without :data:`INFO_HASH` (canonical JSON: sorted keys, no spaces)."""
    return json_hash({k: v for k, v in info.items() if k != INFO_HASH}, length=64, compact=True)


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
    write_text(tmp / PLAN, plan.to_json())
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


EXPORTED_FILES = {"onnx": "model.onnx", "torchscript": "model.ts", "tflite": "model.tflite"}
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


@dataclass(frozen=True)
class ModelFolder:
    """What a model folder holds, read and checked once: its configuration, plan and ``model.json`` (with its own
    hash, and the hashes of the network file and the plan); the network itself is loaded on request
    (:meth:`load_network`). Everything that uses a model folder reads it through here, never ``model.json`` raw.

    Examples:
        >>> folder = ModelFolder.read(model_dir)  # doctest: +SKIP
        >>> folder.labels, folder.spatial_dims, folder.format  # doctest: +SKIP
        ({0: 'background', 1: 'organ', 2: 'lesion'}, 3, 'pytorch')
    """

    path: Path
    config: Config
    plan: Plan
    info: dict[str, Any]  # model.json; labels with int keys

    @classmethod
    def read(cls, path: str | Path) -> ModelFolder:
        """Reads and checks a model folder written by :func:`save_model_dir` or ``medseg export``.

        Raises:
            ModelError: ``MODEL_NOT_FOUND`` (no such folder), ``MODEL_DIR_INVALID`` (files missing or unreadable),
                ``MODEL_CORRUPT`` (model.json, the network file or the plan is not what was recorded).
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
        if info.get("plan_hash") and plan.hash() != info["plan_hash"]:
            raise ModelError("MODEL_CORRUPT", f"{PLAN} of {path.name} is not the plan this model was trained with "
                             "(its hash differs from model.json)", "restore the model folder from its original copy")
        return cls(path, load_config(path / CONFIG), plan, info)

    @property
    def name(self) -> str:
        """The folder's own name (what records and DICOM outputs call the model; never its path)."""
        return self.path.resolve().name

    @property
    def labels(self) -> dict[int, str]:
        return self.info["labels"]

    @property
    def spatial_dims(self) -> int:
        return int(self.info["spatial_dims"])

    @property
    def in_channels(self) -> int:
        return int(self.info["in_channels"])

    @property
    def format(self) -> str:
        """``pytorch``, ``onnx``, ``torchscript`` or ``tflite``."""
        return str(self.info.get("format", "pytorch"))

    @property
    def network_file(self) -> Path:
        return self.path / EXPORTED_FILES.get(self.format, WEIGHTS)

    @property
    def network_sha256(self) -> str | None:
        """The recorded hash of the network file (PyTorch weights or an exported graph)."""
        return self.info.get("weights_sha256") or self.info.get(NETWORK_HASH)

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What decides the arrays the network reads (:func:`medseg.transforms.pipeline.preprocessing_identity`)."""
        from medseg.transforms.pipeline import preprocessing_identity

        return preprocessing_identity(self.config, self.plan)

    def producer(self, uid_root: str | None = None):
        """The :class:`medseg.io.dicom_derived.Producer` DICOM outputs of this model record."""
        import medseg
        from medseg.io.dicom_derived import PYDICOM_ROOT, Producer, label_codes

        return Producer(self.name, self.config.model.name, self.network_sha256 or "", medseg.__version__,
                        uid_root or PYDICOM_ROOT, label_codes(self.config.labels))

    def load_network(self, device: torch.device | str = "cpu") -> nn.Module | None:
        """The PyTorch network in eval mode on ``device`` (None for an exported folder: a backend runs its file).

        Raises:
            ModelError: ``MODEL_DIR_INVALID`` (unreadable or pickled weights), ``MODEL_WEIGHTS_MISMATCH``.
        """
        if self.format != "pytorch":
            return None
        state = load_tensors(self.network_file, "MODEL_DIR_INVALID", "model weights", ModelError)
        if isinstance(self.info.get("nnunet"), dict):  # imported from nnU-Net: the plans' network, one per fold
            from medseg.models.nnunet import NnunetNetwork, build_network

            spec = self.info["nnunet"]
            model: nn.Module = NnunetNetwork([build_network(spec["architecture"], self.in_channels, len(self.labels))
                                              for _ in spec["origin"]["folds"]])
        else:
            model = build_model(self.config.model, self.spatial_dims, self.in_channels, len(self.labels))
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise ModelError("MODEL_WEIGHTS_MISMATCH", f"{self.path.name}: weights do not fit the configured network: "
                             f"{describe(exc, self.path)}") from None
        return model.to(device).eval()


def load_model_dir(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module | None, Config, Plan, dict[str, Any]]:
    """``(network in eval mode on device, config, plan, info)`` of a model folder (:class:`ModelFolder`); the
    network is None for an exported folder.

    Raises:
        ModelError: see :meth:`ModelFolder.read` and :meth:`ModelFolder.load_network`.
    """
    folder = ModelFolder.read(path)
    return folder.load_network(device), folder.config, folder.plan, folder.info
