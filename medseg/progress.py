"""Progress display: a rich live bar on a terminal, nothing otherwise (logs carry the information)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Silent:
    def add_task(self, description: str, total: float | None = None, **kwargs: Any) -> int:
        return 0

    def update(self, task: int, **kwargs: Any) -> None:
        pass


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Any]:
    """Yields an object with rich's ``add_task``/``update``; silent when disabled or not on a terminal."""
    console = Console(stderr=True)
    if not (enabled and console.is_terminal):
        yield _Silent()
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield progress
