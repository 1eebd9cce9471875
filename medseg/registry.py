"""Explicit name -> builder registries filled by a decorator; unknown names list the valid ones."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from medseg.errors import ConfigError

T = TypeVar("T")  # a builder function, or an entry that holds one (models.registry.Network)


class Registry(Generic[T]):
    """A named collection of builders, or of catalogue entries (metrics, output formats) kept in the order they
    were added; it reads like a mapping (``in``, ``[name]``, iteration over names, ``values()``).

    Args:
        kind: What the registry holds, for messages (e.g. ``"model"``).
        config_key: The config key that names an entry (e.g. ``"model.name"``).
        loader: Called once before the entries are first read (imports the modules that register them, so a
            process that never reads the registry never imports them).
    """

    def __init__(self, kind: str, config_key: str, loader: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self.config_key = config_key
        self._store: dict[str, T] = {}
        self._loader = loader

    @property
    def _entries(self) -> dict[str, T]:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader()
        return self._store

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering a builder under ``name``."""

        def decorator(fn: T) -> T:
            return self.add(name, fn)

        return decorator

    def add(self, name: str, entry: T) -> T:
        """Adds ``entry`` under ``name`` (after the entries added before it).

        Raises:
            ValueError: ``name`` is taken.
        """
        if name in self._store:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._store[name] = entry
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list[T]:
        """The entries, in the order they were added."""
        return list(self._entries.values())

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
