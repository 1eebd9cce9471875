"""What a run reports to: the :class:`Tracker` protocol (MLflow implements it in :mod:`medseg.tracking`), a null
tracker, and :func:`tracked_run`, which ends a run as FINISHED or FAILED whatever happens inside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    """What training, evaluation and the demo log through."""

    @property
    def run_id(self) -> str | None:
        """The tracking run's id (None when nothing is tracked)."""

    @property
    def uri(self) -> str:
        """Where the runs are stored ("" when nothing is tracked)."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Logs parameters (values are stringified)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Logs numeric metrics at an optional step (epoch)."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Uploads a file or a whole folder."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Sets run tags (never patient data)."""

    def close(self, status: str = "FINISHED") -> None:
        """Ends the run as ``FINISHED`` or ``FAILED``."""


class NullTracker:
    """Tracks nothing (tests, non-zero torchrun ranks, or tracking switched off)."""

    run_id: str | None = None
    uri: str = ""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


class tracked_run:
    """Ends ``tracker``'s run when the block ends: ``FAILED`` when it raises (Ctrl-C and SIGTERM included; the
    exception goes on) or when :meth:`fail` was called inside it, ``FINISHED`` otherwise.

    Examples:
        >>> with tracked_run(NullTracker()) as run:
        ...     run.tracker.log_metrics({"dice": 0.9})
        ...     run.fail()  # e.g. some test cases failed: the run ends FAILED
        >>> run.status
        'FAILED'
    """

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.status = "FINISHED"

    def fail(self) -> None:
        """The run ends ``FAILED`` although the block completes."""
        self.status = "FAILED"

    def __enter__(self) -> tracked_run:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.status = "FAILED"
        self.tracker.close(self.status)
