"""Which torch device a command runs on: ``auto`` prefers CUDA, then Apple's MPS, then the CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

from medseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def select_device(name: str) -> torch.device:
    """Maps ``auto|cpu|cuda|mps`` to a device; ``auto`` prefers CUDA, then MPS, then CPU.

    Examples:
        >>> select_device("cpu")
        device(type='cpu')

    Raises:
        ConfigError: ``DEVICE_UNAVAILABLE`` when the requested device is not present; ``CONFIG_INVALID_VALUE`` for
            another name.
    """
    import torch

    if name not in DEVICES:
        raise ConfigError("CONFIG_INVALID_VALUE", f"unknown device {name!r}", f"use one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("DEVICE_UNAVAILABLE", "device is cuda but no CUDA GPU is visible", "use device auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("DEVICE_UNAVAILABLE", "device is mps but MPS is not available", "use device auto or cpu")
    return torch.device(name)
