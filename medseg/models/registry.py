"""The model registry."""

from __future__ import annotations

from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.registry import Registry

MODELS: Registry = Registry("model", "model.name")


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
