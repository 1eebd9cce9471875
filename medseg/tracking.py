"""Experiment tracking: a small :class:`Tracker` protocol, an MLflow implementation and a null one.

The default store is embedded: ``sqlite:///<run dir>/mlflow.db`` with artifacts in ``<run dir>/mlartifacts``,
so no server is needed. ``tracking.uri`` in the config, or else the ``MLFLOW_TRACKING_URI`` environment
variable, points it at a team server instead. Only case IDs and configuration reach the store; never
patient identifiers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from medseg.config import TrackingConfig


class Tracker(Protocol):
    """What training, evaluation and the demo log through."""

    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None:
        """Logs parameters (values are stringified)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Logs numeric metrics at an optional step (epoch)."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Uploads a file or a whole folder."""


class NullTracker:
    """Tracks nothing (tests, or tracking switched off)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def default_tracking_uri(run_dir: Path) -> str:
    """``sqlite:///<absolute run dir>/mlflow.db``."""
    return f"sqlite:///{(run_dir.resolve() / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(cfg: TrackingConfig, run_dir: Path) -> str:
    """Config URI, else ``MLFLOW_TRACKING_URI``, else the embedded SQLite store in ``run_dir``."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_dir)


class MlflowTracker:
    """Logs to one MLflow run through ``MlflowClient`` (no global MLflow state is touched).

    Args:
        uri: Tracking URI.
        experiment: Experiment name (created if missing; with an embedded store its artifacts go to
            ``artifact_dir``).
        run_name: Name of a new run; ignored when ``run_id`` is given.
        run_id: Reopen an existing run (e.g. to attach evaluation results to a training run).
        artifact_dir: Artifact folder for a newly created experiment in an embedded store.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        artifact_dir: Path | None = None,
    ) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # MLflow sets its own INFO level on import
            logging.getLogger(name).setLevel(logging.WARNING)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = artifact_dir.resolve().as_uri() if artifact_dir is not None else None
                exp_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id: str | None = run_id

    @classmethod
    def for_run_dir(cls, cfg: TrackingConfig, run_dir: Path, run_name: str) -> "MlflowTracker":
        """Opens a new run in the configured store (embedded SQLite in ``run_dir`` by default)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        uri = resolve_tracking_uri(cfg, run_dir)
        artifact_dir = run_dir / "mlartifacts" if uri.startswith("sqlite:") else None
        return cls(uri, cfg.experiment, run_name=run_name, artifact_dir=artifact_dir)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if not math.isnan(float(v))]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Sets run tags (never patient data)."""
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def close(self, status: str = "FINISHED") -> None:
        """Marks the run ``FINISHED`` or ``FAILED``."""
        self.client.set_terminated(self.run_id, status=status)
