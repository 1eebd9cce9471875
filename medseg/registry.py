"""Explicit name -> builder registries filled by a decorator; unknown names list the valid ones."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from medseg.errors import ConfigError

T = TypeVar("T")  # a builder function, or an entry that holds one (models.registry.Network)


class Registry(Generic[T]):
    """A named collection of builders.

    Args:
        kind: What the registry holds, for messages (e.g. ``"model"``).
        config_key: The config key that names an entry (e.g. ``"model.name"``).
    """

    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering a builder under ``name``."""

        def decorator(fn: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return decorator

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """Returns the builder for ``name``.

        Raises:
            ConfigError: ``CONFIG_UNKNOWN_NAME`` listing the valid names and the closest match.
        """
        if name not in self._entries:
            close = difflib.get_close_matches(name, self.names(), n=1)
            raise ConfigError(
                "CONFIG_UNKNOWN_NAME",
                f"unknown {self.kind} '{name}' in {self.config_key}; valid: {', '.join(self.names())}",
                f"did you mean '{close[0]}'?" if close else None,
            )
        return self._entries[name]
