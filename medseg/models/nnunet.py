"""nnU-Net v2 results folders, read without nnU-Net: ``TRAINER__PLANS__CONFIGURATION/`` with ``plans.json``,
``dataset.json`` and ``fold_k/checkpoint_final.pth`` (or ``checkpoint_best.pth``).

What is read, and how:

* ``plans.json``: the configuration (``2d``, ``3d_fullres``, ``3d_lowres``; ``inherits_from`` resolved as nnU-Net
  does), its patch size, spacing, normalisation schemes, resampling functions and ``architecture`` (the network's
  class in ``dynamic_network_architectures`` and its keyword arguments), and the plans' ``transpose_forward``,
  ``image_reader_writer`` and foreground intensity statistics;
* ``dataset.json``: channel names, labels (names from their keys), ``file_ending``;
* each fold's checkpoint: a pickle, loaded with ``torch.load(weights_only=True)`` and an explicit allowlist of the
  globals nnU-Net's checkpoints hold (:data:`CHECKPOINT_GLOBALS`), so a checkpoint that would run code is refused
  (``NNUNET_CHECKPOINT_UNSAFE``) and runs nothing. Its ``network_weights``, ``trainer_name``,
  ``init_args.configuration`` and ``inference_allowed_mirroring_axes`` are used.

The network is built from the plans' ``architecture`` through ``dynamic_network_architectures`` (classes under that
package only; keyword arguments that name classes may name ``torch.nn`` classes only). Region-based models and the
cascade's second stage are refused with ``NNUNET_UNSUPPORTED`` (what is missing is named).

:class:`NnunetNetwork` holds every fold; its output is the mean of the folds' logits, which is what nnU-Net's
predictor averages. Exact preprocessing and prediction live in :mod:`medseg.inference.nnunet_exact`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import pydoc
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.errors import ModelError, describe
from medseg.fsutil import read_json, sha256_file

CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
SUPPORTED_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
#: nnU-Net's resampling functions medseg reproduces (default_resampling.py).
RESAMPLING = ("resample_data_or_seg_to_shape",)
READERS = ("SimpleITKIO", "NibabelIO", "SimpleITKIOWithReorient")  # the array order these give is the stored one
#: nnU-Net's normalisation classes -> medseg's reproduction (medseg.inference.nnunet_exact.normalise).
NORMALISATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization",
                  "RGBTo01Normalization")
ARCH_PREFIX = "dynamic_network_architectures."
IMPORT_PREFIX = "torch.nn."


def _checkpoint_globals() -> list[Any]:
    """The non-tensor globals of nnU-Net checkpoints (its logger's lists hold numpy floats; ``init_args`` a torch
    device): numpy scalars and dtypes. Nothing here constructs code."""
    import numpy as np

    found: list[Any] = [np.dtype, torch.device]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            found.append(__import__(module, fromlist=["scalar"]).scalar)
        except (ImportError, AttributeError):
            continue
    found += [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "bool")]
    return found


def load_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint as plain data: ``weights_only=True`` with :func:`_checkpoint_globals` allowed.

    Raises:
        ModelError: ``NNUNET_CHECKPOINT_UNSAFE`` (a global outside the allowlist: the pickle would construct or run
            something else), ``NNUNET_CHECKPOINT_INVALID`` (unreadable, or without ``network_weights``).
    """
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc) and "global" not in str(exc):  # not a torch file at all (invalid load key ...)
            raise ModelError("NNUNET_CHECKPOINT_INVALID", f"cannot read {path.parent.name}/{path.name}: not a torch "
                             "checkpoint (damaged or another file)") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise ModelError("NNUNET_CHECKPOINT_UNSAFE", f"{path.parent.name}/{path.name} holds a Python object outside "
                         f"what nnU-Net checkpoints hold{what}; unpickling it could run code, so it is not loaded",
                         "use checkpoints written by nnU-Net's trainer; a checkpoint from an untrusted source may be "
                         "hostile") from None
    except Exception as exc:  # noqa: BLE001 - a truncated zip, not a torch file ...: one error for the user
        text = describe(exc, path, limit=200)
        raise ModelError("NNUNET_CHECKPOINT_INVALID", f"cannot read {path.parent.name}/{path.name}: "
                         f"{'unreadable torch file' if 'weights_only' in text else text}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        raise ModelError("NNUNET_CHECKPOINT_INVALID", f"{path.parent.name}/{path.name} is not an nnU-Net checkpoint "
                         "(no network_weights)")
    return ckpt


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError("NNUNET_FILE_MISSING", f"the nnU-Net results folder {path.parent.name} has no {path.name}",
                         f"pass the folder nnU-Net trained into (TRAINER__PLANS__CONFIGURATION), which holds {what}")
    data = read_json(path, "NNUNET_FILE_MISSING", f"{path.name} of {path.parent.name}", error=ModelError)
    if not isinstance(data, dict):
        raise ModelError("NNUNET_FILE_MISSING", f"{path.name} of {path.parent.name} is not a JSON object")
    return data


def is_results_folder(path: str | Path) -> bool:
    """True for a folder with nnU-Net's ``plans.json`` and ``dataset.json`` and no medseg ``model.json``."""
    p = Path(path)
    return p.is_dir() and (p / "plans.json").is_file() and (p / "dataset.json").is_file() and not (p / "model.json").exists()


def resolve_configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """The plans' configuration ``name`` with ``inherits_from`` resolved (parent first, then the child's keys).

    Raises:
        ModelError: ``NNUNET_CONFIGURATION_MISSING``.
    """
    configs = plans.get("configurations") or {}
    if name not in configs:
        raise ModelError("NNUNET_CONFIGURATION_MISSING", f"the plans have no configuration {name!r} "
                         f"(they have: {', '.join(sorted(configs)) or 'none'})")
    seen: list[str] = []
    current = name
    chain = []
    while current is not None:
        if current in seen or current not in configs:
            raise ModelError("NNUNET_CONFIGURATION_MISSING", f"configuration {name!r} inherits from {current!r}, "
                             "which the plans do not have (or which inherits from itself)")
        seen.append(current)
        chain.append(configs[current])
        current = configs[current].get("inherits_from")
    resolved: dict[str, Any] = {}
    for part in reversed(chain):
        resolved.update(copy.deepcopy(part))
    resolved.pop("inherits_from", None)
    return resolved


def labels_of(dataset: dict[str, Any]) -> dict[int, str]:
    """``{value: name}`` of ``dataset.json``'s ``labels`` (ignore label left out).

    Raises:
        ModelError: ``NNUNET_UNSUPPORTED`` for region-based labels (a list of values per region).
    """
    raw = dataset.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise ModelError("NNUNET_FILE_MISSING", "dataset.json has no labels")
    out: dict[int, str] = {}
    for name, value in raw.items():
        if isinstance(value, (list, tuple)):
            if len(value) == 1:
                value = value[0]
            else:
                raise ModelError("NNUNET_UNSUPPORTED", f"the model is region-based (label {name!r} is the region "
                                 f"{list(value)}): medseg does not run region-based nnU-Net models yet (it would need "
                                 "sigmoid outputs and regions_class_order)", "run this model with nnUNetv2_predict")
        if str(name).lower() == "ignore":
            continue
        out[int(value)] = str(name)
    if sorted(out) != list(range(len(out))):
        raise ModelError("NNUNET_FILE_MISSING", f"dataset.json labels are not consecutive from 0: {sorted(out)}")
    return dict(sorted(out.items()))


def channel_names(dataset: dict[str, Any]) -> list[str]:
    names = dataset.get("channel_names") or dataset.get("modality")
    if not isinstance(names, dict) or not names:
        raise ModelError("NNUNET_FILE_MISSING", "dataset.json has no channel_names")
    return [str(names[k]) for k in sorted(names, key=lambda k: int(k))]


def _locate(name: str, prefix: str, what: str) -> Any:
    if not isinstance(name, str) or not name.startswith(prefix):
        raise ModelError("NNUNET_NETWORK_UNBUILDABLE", f"the plans name {what} {name!r}, outside {prefix}*: medseg "
                         "builds nnU-Net networks from dynamic-network-architectures only")
    found = pydoc.locate(name)
    if found is None:
        raise ModelError("NNUNET_NETWORK_UNBUILDABLE", f"{what} {name} is not in the installed "
                         f"{prefix.rstrip('.')} package", "pip install -U dynamic-network-architectures")
    return found


def build_network(architecture: dict[str, Any], in_channels: int, out_channels: int) -> nn.Module:
    """The plans' ``architecture`` built as nnU-Net's ``get_network_from_plans`` does, without deep supervision.

    Raises:
        ModelError: ``NNUNET_NETWORK_UNBUILDABLE``.
    """
    try:
        cls_name = architecture["network_class_name"]
        kwargs = dict(architecture["arch_kwargs"])
        needs_import = list(architecture.get("_kw_requires_import") or [])
    except (KeyError, TypeError):
        raise ModelError("NNUNET_NETWORK_UNBUILDABLE", "the configuration has no architecture (network_class_name, "
                         "arch_kwargs): plans from nnU-Net before 2.4 are not supported") from None
    from medseg.models.registry import require_package

    require_package("dynamic_network_architectures", "nnU-Net models", "dynamic-network-architectures")
    cls = _locate(cls_name, ARCH_PREFIX, "the network class")
    for key in needs_import:
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(kwargs[key], IMPORT_PREFIX, f"argument {key}")
    try:
        net = cls(input_channels=in_channels, num_classes=out_channels, deep_supervision=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a constructor's own validation: one error naming the class
        raise ModelError("NNUNET_NETWORK_UNBUILDABLE", f"{cls_name.rsplit('.', 1)[-1]} cannot be built from these "
                         f"plans: {describe(exc, limit=200)}") from None
    return net


class NnunetNetwork(nn.Module):
    """The folds of an nnU-Net model; the output is the mean of their logits (nnU-Net averages logits over folds)."""

    def __init__(self, nets: list[nn.Module]) -> None:
        super().__init__()
        self.folds = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.folds[0](x)
        for net in self.folds[1:]:
            out = out + net(x)
        return out / len(self.folds) if len(self.folds) > 1 else out


@dataclass
class NnunetModel:
    """An nnU-Net results folder, read and checked: what :mod:`medseg.inference.nnunet_exact` needs (``spec``) and
    the folds' weights."""

    path: Path
    spec: dict[str, Any]  # JSON-able: plans subset, configuration, labels, channels, origin
    weights: list[dict[str, torch.Tensor]] = field(repr=False)

    @property
    def labels(self) -> dict[int, str]:
        return {int(k): v for k, v in self.spec["labels"].items()}

    def network(self) -> NnunetNetwork:
        """The folds in one module, eval mode, on the CPU.

        Raises:
            ModelError: ``NNUNET_NETWORK_UNBUILDABLE``, ``NNUNET_CHECKPOINT_INVALID`` (weights do not fit).
        """
        nets = []
        for fold, state in zip(self.spec["origin"]["folds"], self.weights):
            net = build_network(self.spec["architecture"], len(self.spec["channels"]), len(self.spec["labels"]))
            try:
                net.load_state_dict(state)
            except (RuntimeError, TypeError) as exc:
                raise ModelError("NNUNET_CHECKPOINT_INVALID", f"fold {fold}'s weights do not fit the network the "
                                 f"plans describe: {describe(exc, limit=200)}") from None
            nets.append(net)
        return NnunetNetwork(nets).eval()


def spec_from(plans: dict[str, Any], dataset: dict[str, Any], configuration: str) -> dict[str, Any]:
    """The JSON-able description of one configuration that exact prediction needs.

    Raises:
        ModelError: ``NNUNET_CONFIGURATION_MISSING``, ``NNUNET_UNSUPPORTED``.
    """
    config = resolve_configuration(plans, configuration)
    if config.get("previous_stage") or "cascade" in configuration:
        raise ModelError("NNUNET_UNSUPPORTED", f"{configuration} is the cascade's second stage: it needs the "
                         "3d_lowres prediction as an input, which medseg does not run yet",
                         "run 3d_fullres or 3d_lowres, or nnUNetv2_predict for the cascade")
    reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
    if reader not in READERS:
        raise ModelError("NNUNET_UNSUPPORTED", f"the plans read images with {reader}; medseg reproduces the array "
                         f"order of {', '.join(READERS)} only")
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if config.get(key) not in RESAMPLING:
            raise ModelError("NNUNET_UNSUPPORTED", f"{key} is {config.get(key)!r}; medseg reproduces "
                             f"{', '.join(RESAMPLING)} only")
    channels = channel_names(dataset)
    schemes = list(config.get("normalization_schemes") or [])
    unknown = [s for s in schemes if s not in NORMALISATIONS]
    if unknown or len(schemes) != len(channels):
        raise ModelError("NNUNET_UNSUPPORTED", f"normalisation schemes {schemes} for {len(channels)} channel(s): "
                         f"medseg reproduces {', '.join(NORMALISATIONS)}, one per channel")
    labels = labels_of(dataset)
    intensity = plans.get("foreground_intensity_properties_per_channel") or {}
    return {
        "configuration": configuration,
        "spatial_dims": len(config["patch_size"]),
        "patch_size": [int(p) for p in config["patch_size"]],
        "spacing": [float(s) for s in config["spacing"]],
        "normalization_schemes": schemes,
        "use_mask_for_norm": [bool(u) for u in (config.get("use_mask_for_norm") or [False] * len(schemes))],
        "resampling_data": dict(config.get("resampling_fn_data_kwargs") or {}),
        "resampling_probabilities": dict(config.get("resampling_fn_probabilities_kwargs") or {}),
        "architecture": config.get("architecture"),
        "transpose_forward": [int(i) for i in plans.get("transpose_forward", [0, 1, 2])],
        "transpose_backward": [int(i) for i in plans.get("transpose_backward", [0, 1, 2])],
        "intensity": {str(k): {kk: float(vv) for kk, vv in v.items() if isinstance(vv, (int, float))}
                      for k, v in intensity.items()},
        "image_reader_writer": reader,
        "channels": channels,
        "labels": {str(k): v for k, v in labels.items()},
        "file_ending": str(dataset.get("file_ending", ".nii.gz")),
    }


def _folds(path: Path, folds: list[str] | None, checkpoint: str) -> list[str]:
    if folds:
        return ["all" if str(f) == "all" else str(int(f)) for f in folds]
    found = sorted(p.name[5:] for p in path.glob("fold_*") if (p / checkpoint).is_file())
    if not found:
        raise ModelError("NNUNET_FILE_MISSING", f"the nnU-Net results folder {path.name} has no fold_*/{checkpoint}",
                         "train a fold first, or pass --checkpoint best if only checkpoint_best.pth exists")
    return found


def read_results_folder(path: str | Path, folds: list[str] | None = None, checkpoint: str = "final",
                        configuration: str | None = None) -> NnunetModel:
    """Reads and checks an nnU-Net v2 results folder (every fold's checkpoint is loaded safely).

    Args:
        folds: ``["0", "1"]``, ``["all"]``; None = every ``fold_*`` with the checkpoint.
        checkpoint: ``final`` or ``best``.
        configuration: None = the checkpoints' ``init_args.configuration`` (else the folder name's last part).

    Raises:
        ModelError: ``NNUNET_FILE_MISSING`` (naming the file), ``NNUNET_CONFIGURATION_MISSING``,
            ``NNUNET_CHECKPOINT_UNSAFE``, ``NNUNET_CHECKPOINT_INVALID``, ``NNUNET_FOLDS_INCOMPATIBLE``,
            ``NNUNET_UNSUPPORTED``, ``NNUNET_NETWORK_UNBUILDABLE``.
    """
    path = Path(path)
    if checkpoint not in CHECKPOINTS:
        raise ModelError("CONFIG_INVALID_VALUE", f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, not {checkpoint!r}")
    plans = _read_json(path / "plans.json", "plans.json")
    dataset = _read_json(path / "dataset.json", "dataset.json")
    ckpt_name = CHECKPOINTS[checkpoint]
    weights, hashes, meta = [], {}, None
    chosen = _folds(path, folds, ckpt_name)
    for fold in chosen:
        file = path / f"fold_{fold}" / ckpt_name
        if not file.is_file():
            raise ModelError("NNUNET_FILE_MISSING", f"the nnU-Net results folder {path.name} has no "
                             f"fold_{fold}/{ckpt_name}", "pass --folds with the folds that were trained")
        ckpt = load_checkpoint(file)
        init: dict[str, Any] = ckpt["init_args"] if isinstance(ckpt.get("init_args"), dict) else {}
        this = {"trainer": str(ckpt.get("trainer_name", "")), "configuration": init.get("configuration"),
                "mirroring": ckpt.get("inference_allowed_mirroring_axes"),
                "plans_name": (init.get("plans") or {}).get("plans_name") if isinstance(init.get("plans"), dict) else None}
        if meta is None:
            meta = this
        elif this != meta:
            diff = [k for k in this if this[k] != meta[k]]
            raise ModelError("NNUNET_FOLDS_INCOMPATIBLE", f"fold {fold} differs from fold {chosen[0]} in "
                             f"{', '.join(diff)}: the folds were not trained with the same trainer and plans",
                             "pass --folds with folds of one training")
        weights.append(ckpt["network_weights"])
        hashes[fold] = sha256_file(file)
    assert meta is not None
    name = configuration or meta["configuration"] or path.name.split("__")[-1]
    spec = spec_from(plans, dataset, str(name))
    mirroring = meta["mirroring"]
    spec["origin"] = {
        "framework": "nnU-Net v2",
        "results_folder": path.resolve().name,
        "dataset": str(plans.get("dataset_name", "")),
        "plans": str(plans.get("plans_name", "")),
        "trainer": meta["trainer"],
        "configuration": str(name),
        "folds": chosen,
        "checkpoint": ckpt_name,
        "checkpoint_sha256": hashes,
        "mirroring_axes": [int(a) for a in mirroring] if mirroring is not None else None,
        "trained_with": _training_facts(path),
    }
    model = NnunetModel(path, spec, weights)
    return model


def _training_facts(path: Path) -> dict[str, str]:
    """What the first fold's ``debug.json`` records of the training software (nnU-Net 2.x writes torch's and cuDNN's
    versions there; its checkpoints record no nnU-Net version). Empty when there is none."""
    for debug in sorted(path.glob("fold_*/debug.json")):
        try:
            data = json.loads(debug.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return {k: str(data[k]) for k in ("nnunet_version", "torch_version", "cudnn_version") if data.get(k)}
    return {}


#: model.json key of an nnU-Net model's description (:func:`spec_from` plus ``origin``).
SPEC_KEY = "nnunet"


def origin_label(info: dict[str, Any]) -> str | None:
    """``nnU-Net v2 nnUNetTrainer__nnUNetPlans__3d_fullres (folds 0, 1)`` for a model of nnU-Net origin, else None
    (what reports and DICOM outputs name as the network)."""
    spec = info.get(SPEC_KEY)
    if not isinstance(spec, dict) or not isinstance(spec.get("origin"), dict):
        return None
    o = spec["origin"]
    return (f"{o.get('framework', 'nnU-Net v2')} {o.get('trainer')}__{o.get('plans')}__{o.get('configuration')} "
            f"(fold{'s' if len(o.get('folds') or []) > 1 else ''} {', '.join(o.get('folds') or [])})")


def records(model: NnunetModel) -> tuple[Any, Any, dict[str, Any]]:
    """``(Config, Plan, model.json info)`` that let every medseg command treat the nnU-Net model as a model folder:
    labels, channels and dimensions from dataset.json and the plans; the nnU-Net description under :data:`SPEC_KEY`;
    QC off by default (nnU-Net models carry no training statistics for it; ``--qc`` turns it on)."""
    from medseg.config import load_config
    from medseg.plan.planner import Plan

    spec = model.spec
    cfg = load_config(None)
    origin = spec["origin"]
    cfg = cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"patch_size": tuple(spec["patch_size"]), "spacing": tuple(spec["spacing"])}),
        "model": cfg.model.model_copy(update={"name": "nnunet", "deep_supervision": False}),
        "inference": cfg.inference.model_copy(update={
            "tta": origin["mirroring_axes"] is not None, "overlap": 0.5, "sw_batch_size": 1,
            "qc": cfg.inference.qc.model_copy(update={"enabled": False})}),
    })
    aniso = max(spec["spacing"]) / min(spec["spacing"]) > 3
    plan = Plan(dims=int(spec["spatial_dims"]), spacing=list(spec["spacing"]), patch_size=list(spec["patch_size"]),
                batch_size=1, channels=[], strides=[], normalization=list(spec["normalization_schemes"]),
                intensity=[spec["intensity"].get(str(c), {}) for c in range(len(spec["channels"]))], anisotropic=aniso,
                fingerprint_hash=hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16],
                notes=[f"nnU-Net plans {origin['plans']}, configuration {origin['configuration']} (axes in nnU-Net's "
                       "transposed array order)"])
    combined = "".join(origin["checkpoint_sha256"][f] for f in origin["folds"])
    info = {"labels": model.labels, "spatial_dims": int(spec["spatial_dims"]), "in_channels": len(spec["channels"]),
            "channel_names": spec["channels"], SPEC_KEY: spec,
            "weights_sha256": hashlib.sha256(combined.encode()).hexdigest() if len(origin["folds"]) > 1 else combined}
    return cfg, plan, info


def import_results_folder(results: str | Path, out: str | Path, folds: list[str] | None = None,
                          checkpoint: str = "final") -> Path:
    """Writes an nnU-Net results folder as a medseg model folder (``weights.pt`` holds every fold; ``model.json``
    the nnU-Net description and origin, with the checkpoints' hashes).

    Raises:
        ModelError: see :func:`read_results_folder`; ``MODEL_DIR_INVALID`` when ``out`` is the results folder.
    """
    from medseg.models.folder import save_model_dir

    results, out = Path(results), Path(out)
    if out.resolve() == results.resolve():
        raise ModelError("MODEL_DIR_INVALID", "the medseg model folder must not be the nnU-Net results folder")
    model = read_results_folder(results, folds, checkpoint)
    cfg, plan, info = records(model)
    return save_model_dir(out, model.network(), cfg, plan, {**info, "origin": model.spec["origin"]})
