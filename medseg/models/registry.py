"""The network registry: each entry is a builder and its :class:`NetworkSpec`.

A network is one module that registers itself with :func:`network`::

    @network("mynet", NetworkSpec(dims=(2, 3), reads=("channels", "strides"), min_deepest=2))
    def mynet(cfg: ModelConfig, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module: ...

plus its module name in :data:`BUILTIN`; the modules are imported when the registry is first read, so a process
that only runs an exported model never imports the networks' libraries (MONAI among them). The spec says what the planner, the checks and export need to
know; :func:`build_model` applies the checks every entry shares (dimensions, deep supervision, size, packages)
before the builder runs, and :func:`check_network` applies them to a configuration before any case is read.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from torch import nn

from medseg.config import Config, ModelConfig
from medseg.errors import ConfigError, describe
from medseg.registry import Registry

Builder = Callable[[ModelConfig, int, int, int], nn.Module]


@dataclass(frozen=True)
class NetworkSpec:
    """What a network is and needs, declared once beside its builder.

    Attributes:
        dims: Spatial dimensions it is built for.
        deep_supervision: It can return deep-supervision outputs (``model.deep_supervision``).
        fixed_levels: Downsampling steps of a fixed-depth network (patches are multiples of ``2**fixed_levels``);
            None: from ``model.strides``.
        min_batch: Smallest training batch (BatchNorm needs 2).
        memory_factor: Training memory per voxel relative to the UNet of the same dimension (the planner's
            estimate; measured by ``benchmarks/models.py``, ``benchmarks/results/models.json``).
        requires: Modules that must import (third-party packages); ``install`` says what to install.
        install: The pip requirement naming them.
        not_exportable: Why ONNX/TorchScript export is refused (``EXPORT_UNSUPPORTED``); empty when it exports.
        min_deepest: Voxels its deepest level needs in training, all axes together (InstanceNorm needs more than
            one: 2): the patch divided by the total stride must hold at least this many.
        reads: The ``model.*`` keys it reads.
        sizes: Accepted ``model.size`` values (empty: it reads no size).
        plan_hints: ``(model config, dims) -> plan settings`` it needs (nnU-Net's ResEnc GPU targets).
    """

    dims: tuple[int, ...] = (2, 3)
    deep_supervision: bool = False
    fixed_levels: int | None = None
    min_batch: int = 1
    memory_factor: float = 1.0
    requires: tuple[str, ...] = ()
    install: str = ""
    not_exportable: str = ""
    min_deepest: int = 1
    reads: tuple[str, ...] = ()
    sizes: tuple[str, ...] = ()
    plan_hints: Callable[[ModelConfig, int], dict] | None = None


@dataclass(frozen=True)
class Network:
    """A registry entry."""

    name: str
    build: Builder
    spec: NetworkSpec


#: The modules of ``medseg.models`` that register networks, imported when :data:`MODELS` is first read.
BUILTIN = ("deeplabv3", "dynunet", "resenc", "segformer", "segresnet", "smp", "swinunetr", "unet", "unetpp")


def _import_builtin() -> None:
    for module in BUILTIN:
        importlib.import_module(f"medseg.models.{module}")


MODELS: Registry[Network] = Registry("model", "model.name", loader=_import_builtin)


def network(name: str, spec: NetworkSpec) -> Callable[[Builder], Builder]:
    """Registers a builder under ``name`` with its spec (a decorator; the builder is returned unchanged)."""

    def decorator(build: Builder) -> Builder:
        MODELS.register(name)(Network(name, build, spec))
        return build

    return decorator


def spec_of(name: str) -> NetworkSpec:
    """The spec of a registered network.

    Raises:
        ConfigError: ``CONFIG_UNKNOWN_NAME`` listing the valid names and the closest one.
    """
    return MODELS.get(name).spec


def _having(test: Callable[[NetworkSpec], bool]) -> str:
    return ", ".join(n for n in MODELS.names() if test(MODELS.get(n).spec))


def _check_spec(cfg: ModelConfig, spec: NetworkSpec, spatial_dims: int | None) -> None:
    if spatial_dims is not None and spatial_dims not in spec.dims:
        raise ConfigError("CONFIG_INVALID_VALUE", f"{cfg.name} is a {'/'.join(f'{d}D' for d in spec.dims)} network",
                          f"for {spatial_dims}D use one of: {_having(lambda s: spatial_dims in s.dims)}")
    if cfg.deep_supervision and not spec.deep_supervision:
        raise ConfigError("CONFIG_INVALID_VALUE", f"model {cfg.name} has no deep supervision",
                          f"networks with deep supervision: {_having(lambda s: s.deep_supervision)}")
    if cfg.size is not None and spec.sizes and str(cfg.size) not in spec.sizes:
        raise ConfigError("CONFIG_INVALID_VALUE", f"{cfg.name} has no size {cfg.size!r}",
                          f"use model.size={' | '.join(spec.sizes)}")
    for module in spec.requires:
        require_package(module, cfg.name, spec.install)


def build_model(cfg: ModelConfig, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """Builds the network named by ``cfg.name``, after the checks every entry shares (:class:`NetworkSpec`).

    Args:
        cfg: The ``model`` section of the configuration.
        spatial_dims: 2 or 3.
        in_channels: Image channels ``C`` of the ``(B, C, *spatial)`` input.
        out_channels: Number of classes, background included; the output is ``(B, out_channels, *spatial)`` logits.

    Examples:
        >>> import torch
        >>> from medseg.config import load_config
        >>> net = build_model(load_config("smoke").model, spatial_dims=3, in_channels=1, out_channels=3)
        >>> net(torch.zeros(1, 1, 16, 16, 8)).shape  # (B, K, X, Y, Z) logits
        torch.Size([1, 3, 16, 16, 8])

    Raises:
        ConfigError: ``CONFIG_UNKNOWN_NAME`` for an unregistered name; ``CONFIG_INVALID_VALUE`` for a dimension,
            deep supervision or size the network does not have; ``MODEL_DEPENDENCY_MISSING``.
    """
    entry = MODELS.get(cfg.name)
    _check_spec(cfg, entry.spec, spatial_dims)
    return entry.build(cfg, spatial_dims, in_channels, out_channels)


def check_network(cfg: Config) -> None:
    """Checks a configuration's network, loss and optimizer before any case is read or any run opened: names,
    dimensions (when ``data.spacing`` or ``data.patch_size`` is pinned), deep supervision, size, packages, and
    whatever is already resolved of patch, strides and batch (:func:`check_resolved`).

    Raises:
        ConfigError: ``CONFIG_UNKNOWN_NAME``, ``CONFIG_INVALID_VALUE``, ``MODEL_DEPENDENCY_MISSING``.
    """
    from medseg.losses import LOSSES

    LOSSES.get(cfg.loss.name)
    pinned = cfg.data.patch_size or cfg.data.spacing
    _check_spec(cfg.model, spec_of(cfg.model.name), len(pinned) if pinned else None)
    check_resolved(cfg, partial=True)


def check_resolved(cfg: Config, partial: bool = False) -> None:
    """The planned values are set and fit the network: the patch is divisible by the total stride and gives the
    deepest level at least ``min_deepest`` voxels per axis; the batch is at least ``min_batch``. With ``partial``
    (before planning) only what is already set is checked.

    Raises:
        ConfigError: ``CONFIG_MISSING_KEY`` / ``CONFIG_INVALID_VALUE``.
    """
    spec = spec_of(cfg.model.name)
    values = {"data.spacing": cfg.data.spacing, "data.patch_size": cfg.data.patch_size,
              "model.channels": cfg.model.channels, "model.strides": cfg.model.strides,
              "train.batch_size": cfg.train.batch_size}
    for key, value in values.items():
        if value is None and not partial:
            raise ConfigError("CONFIG_MISSING_KEY", f"{key} is null after planning",
                              "set it, or leave both model.channels and model.strides null")
    patch, strides = cfg.data.patch_size, cfg.model.strides
    if patch is not None and cfg.data.spacing is not None and len(patch) != len(cfg.data.spacing):
        raise ConfigError("CONFIG_INVALID_VALUE", "data.patch_size and data.spacing must have the same length")
    if patch is not None and strides is not None:
        divisor = int(math.prod(strides))
        if any(p % divisor for p in patch):
            raise ConfigError("CONFIG_INVALID_VALUE", f"data.patch_size {list(patch)} must be divisible by {divisor} "
                              "(product of model.strides)")
        deepest = [p // divisor for p in patch]
        if math.prod(deepest) < spec.min_deepest:
            raise ConfigError("CONFIG_INVALID_VALUE", f"{cfg.model.name}'s deepest level would be {deepest} voxels with "
                              f"patch {list(patch)} and total stride {divisor}: it needs at least {spec.min_deepest} "
                              "(InstanceNorm in training)", f"make data.patch_size larger (multiples of {divisor}, one "
                              f"axis at least {2 * divisor}), or leave it null for the plan")
    if cfg.train.batch_size is not None and cfg.train.batch_size < spec.min_batch:
        raise ConfigError("CONFIG_INVALID_VALUE", f"{cfg.model.name} trains with train.batch_size of at least "
                          f"{spec.min_batch} (found {cfg.train.batch_size}): its BatchNorm needs more than one sample",
                          f"set train.batch_size={spec.min_batch}")


def require_package(module: str, network: str, package: str) -> ModuleType:
    """Imports the third-party package a network is built from.

    Raises:
        ConfigError: ``MODEL_DEPENDENCY_MISSING`` naming what to install (also when the package is installed but
            does not import, e.g. a torchvision built for another torch).
    """
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - ImportError, or RuntimeError from a torchvision/torch mismatch
        reason = "is not installed" if isinstance(exc, ModuleNotFoundError) else f"does not import: {describe(exc, limit=200)}"
        raise ConfigError("MODEL_DEPENDENCY_MISSING", f"{network} needs the {package} package, which {reason}",
                          "pip install 'medseg[networks]' (torchvision must be the build that matches your torch)") from None


def missing_package(name: str) -> str | None:
    """The first module of a registry entry's ``requires`` that does not import here, or None when it can be built."""
    for module in spec_of(name).requires:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - a torchvision built for another torch raises RuntimeError
            return module
    return None
