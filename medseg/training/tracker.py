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


class Trackers:
    """Several trackers as one (MLflow and TensorBoard): every call goes to each; ``run_id`` and ``uri`` are the
    first's, and so are its extra methods (``log_pytorch_model``, ``start_system_metrics``); ``log_overlay`` and
    ``log_graph`` go to each tracker that has them.

    Examples:
        >>> both = Trackers(NullTracker(), NullTracker())
        >>> both.log_metrics({"dice": 0.9}, step=1); both.run_id is None
        True
    """

    def __init__(self, primary: Tracker, *others: Any) -> None:
        self.members = [primary, *others]

    @property
    def run_id(self) -> str | None:
        return self.members[0].run_id

    @property
    def uri(self) -> str:
        return self.members[0].uri

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for member in self.members:
            call = getattr(member, method, None)
            if call is not None:
                call(*args, **kwargs)

    def log_params(self, params: dict[str, Any]) -> None:
        self._each("log_params", params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._each("log_metrics", metrics, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._each("log_artifact", path, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._each("set_tags", tags)

    def log_overlay(self, *args: Any) -> None:
        self._each("log_overlay", *args)

    def log_graph(self, *args: Any) -> None:
        self._each("log_graph", *args)

    def close(self, status: str = "FINISHED") -> None:
        self._each("close", status)

    def __getattr__(self, name: str) -> Any:  # the primary's extras
        if name == "members":
            raise AttributeError(name)
        return getattr(self.members[0], name)


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
