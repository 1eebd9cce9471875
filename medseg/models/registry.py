"""The model registry."""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ConfigError, describe
from medseg.registry import Registry

MODELS: Registry = Registry("model", "model.name")

#: Training memory per voxel of each network relative to medseg's UNet of the same dimension, for the planner (which
#: shrinks patch and batch until its estimate fits the budget). Measured by ``benchmarks/models.py`` on a CPU (peak
#: RSS of three training steps at the benchmark's sizes; ``benchmarks/results/models.json``); a network missing here
#: plans as the UNet. Fixed-width networks (segformer, smp, deeplabv3) were measured at their default sizes.
MEMORY_FACTOR: dict[str, float] = {
    "dynunet": 4.05, "segresnet": 3.57, "resenc_unet": 4.3, "swinunetr": 9.91,
    "unetpp": 7.24, "segformer": 2.08, "smp": 3.04, "deeplabv3": 2.44,
}


def build_model(cfg: ModelConfig, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """Builds the network named by ``cfg.name``.

    Args:
        cfg: The ``model`` section of the configuration.
        spatial_dims: 2 or 3.
        in_channels: Image channels ``C`` of the ``(B, C, *spatial)`` input.
        out_channels: Number of classes, background included; the output is ``(B, out_channels, *spatial)`` logits.

    Raises:
        ConfigError: ``CONFIG_UNKNOWN_NAME`` for an unregistered name.
    """
    return MODELS.get(cfg.name)(cfg, spatial_dims, in_channels, out_channels)


def refuse_deep_supervision(cfg: ModelConfig) -> None:
    """For networks without deep supervision: ``model.deep_supervision: true`` is an error, not ignored.

    Raises:
        ConfigError: ``CONFIG_INVALID_VALUE``.
    """
    if cfg.deep_supervision:
        raise ConfigError("CONFIG_INVALID_VALUE", f"model {cfg.name} has no deep supervision",
                          "use model.name=dynunet or unetpp for deep supervision")


def require_package(module: str, network: str, package: str) -> ModuleType:
    """Imports the third-party package a network is built from.

    Raises:
        ConfigError: ``MODEL_DEPENDENCY_MISSING`` naming what to install (also when the package is installed but
            does not import, e.g. a torchvision built for another torch).
    """
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - ImportError, or RuntimeError from a torchvision/torch mismatch
        raise ConfigError("MODEL_DEPENDENCY_MISSING", f"{network} needs the {package} package, which "
                          f"{'is not installed' if isinstance(exc, ModuleNotFoundError) else 'does not import: ' + describe(exc, limit=200)}",
                          "pip install 'medseg[networks]' (torchvision must be the build that matches your torch)") from None


def require_dims(name: str, spatial_dims: int, dims: tuple[int, ...]) -> None:
    """For networks of one dimension (``dims``, e.g. ``(2,)``): another is an error naming the networks that have it.

    Raises:
        ConfigError: ``CONFIG_INVALID_VALUE``.
    """
    if spatial_dims not in dims:
        raise ConfigError("CONFIG_INVALID_VALUE", f"{name} is a {'/'.join(f'{d}D' for d in dims)} network",
                          "for 3D use resenc_unet, segresnet, swinunetr, dynunet or unet")


def missing_package(name: str) -> str | None:
    """The first package of a registry entry's ``requires`` that does not import here, or None when it can be built."""
    for module in getattr(MODELS.get(name), "requires", ()):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - a torchvision built for another torch raises RuntimeError
            return module
    return None
