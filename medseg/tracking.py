"""Experiment tracking through MLflow, and TensorBoard beside it: :class:`MlflowTracker` and
:class:`TensorBoardTracker` implement the :class:`medseg.training.tracker.Tracker` protocol.

The default store is embedded: ``sqlite:///<run dir>/mlflow.db`` with artifacts in ``<run dir>/mlartifacts``,
so no server is needed. ``tracking.uri`` in the config, or else the ``MLFLOW_TRACKING_URI`` environment
variable, points it at a team server instead. Only case IDs and configuration reach the store; never
patient identifiers.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import TrackingConfig
from medseg.errors import describe, require_extra

log = logging.getLogger(__name__)


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
        run_id: Reopen an existing run.
        artifact_dir: Artifact folder for a newly created experiment in an embedded store.
        reopen: With ``run_id``: ``resume`` (training continues the run: it is marked RUNNING at the first
            metric, parameter or artifact logged, and :meth:`close` sets its final status; a resume that logs
            nothing, e.g. one refused as ``RESUME_NOTHING_TO_DO``, leaves status and end time as they were) or
            ``attach`` (results are added to a run that ended, e.g. an evaluation: its status, end time and
            params are never changed, and :meth:`close` leaves them).
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        artifact_dir: Path | None = None,
        reopen: str = "resume",
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
            self._mode, self._running = "new", True
        else:
            if reopen not in ("resume", "attach"):
                raise ValueError(f"reopen must be 'resume' or 'attach', not {reopen!r}")
            self.client.get_run(run_id)  # fails now, not at the first log call, when the run does not exist
            self._mode, self._running = reopen, False
        self.run_id: str = run_id

    def _writing(self) -> None:
        """A resumed run is RUNNING again from its first write on (an attached run keeps its status)."""
        if not self._running and self._mode == "resume":
            self.client.update_run(self.run_id, status="RUNNING")
        self._running = True

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        self._writing()
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if not math.isnan(float(v))]
        if items:
            self._writing()
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._writing()
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Sets run tags (never patient data)."""
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def start_system_metrics(self) -> None:
        """Starts logging CPU, memory (and GPU, where visible) use every 10 s to this run until :meth:`close`."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.uri)
        self._monitor.start()

    def log_pytorch_model(self, net, in_channels: int, spatial_dims: int, divisor: int, cfg) -> None:
        """Logs the network with ``mlflow.pytorch`` (signature and a small input example); registers it under
        ``cfg.registered_model`` with ``cfg.alias`` when set. Uses ``torch.export`` serialisation (no pickle) where
        the network exports, MLflow's default otherwise; medseg itself never loads models from MLflow."""
        import logging
        import warnings

        import mlflow
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        from medseg.models.contract import final_output

        example = np.zeros((2, in_channels, *([2 * divisor] * spatial_dims)), dtype=np.float32)  # (2, C, *spatial)
        net = net.eval().cpu()
        with torch.no_grad():
            output = final_output(net(torch.from_numpy(example))).numpy()
        signature = infer_signature(example, output)
        mlflow.set_tracking_uri(self.uri)
        kwargs = dict(name="pytorch_model", signature=signature, input_example=example, pip_requirements=["torch", "monai"],
                      registered_model_name=cfg.registered_model)
        self._writing()
        # MLflow announces its own API changes (export_model's FutureWarning) on the user's console: not medseg's news
        with mlflow.start_run(run_id=self.run_id), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                info = mlflow.pytorch.log_model(net, export_model=True, **kwargs)
            except Exception as exc:  # noqa: BLE001 - torch.export does not cover every network
                logging.getLogger(__name__).info("torch.export failed (%s); logging the model with MLflow's default", exc)
                info = mlflow.pytorch.log_model(net, **kwargs)
        self.client.update_run(self.run_id, status="RUNNING")
        if cfg.registered_model and cfg.alias and info.registered_model_version is not None:
            self.client.set_registered_model_alias(cfg.registered_model, cfg.alias, str(info.registered_model_version))

    def log_pyfunc_model(self, model_dir: Path) -> None:
        """Logs a model folder as the MLflow pyfunc model ``medseg_model`` (:mod:`medseg.deploy.pyfunc`)."""
        from medseg.deploy.pyfunc import log_pyfunc

        self._writing()
        log_pyfunc(self.run_id, self.uri, model_dir)
        self.client.update_run(self.run_id, status="RUNNING")  # the run goes on (evaluation); close() ends it

    def close(self, status: str = "FINISHED") -> None:
        """Stops system metrics (if started) and marks the run ``FINISHED`` or ``FAILED`` -- unless it was
        attached to, or resumed without anything logged (then its status and end time stay as they were)."""
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            monitor.finish()
        if self._mode == "attach" or not self._running:
            return
        self.client.set_terminated(self.run_id, status=status)


# ----------------------------------------------------------------------------------------------- TensorBoard

class TensorBoardTracker:
    """Writes a run's scalars, parameters, validation overlays and graph as TensorBoard event files
    (``tracking.tensorboard: true`` or ``medseg train --tensorboard DIR``).

    It adds two methods to the protocol that the trainer looks for: :meth:`log_overlay` (the first validation case's
    prediction and reference on its image, every validation) and :meth:`log_graph` (the network, where
    ``torch.jit.trace`` follows it). Every metric MLflow gets is a scalar here under the same name and step (the
    epoch): ``train_loss``, ``lr``, ``epoch_time_s``, ``samples_per_s``, ``val_dice_<label>``, ``val_dice_mean``.
    Only rank 0 of a torchrun job writes (:func:`medseg.workflow.open_run_tracker` gives other ranks a null
    tracker). A resumed run purges the events after its last checkpoint, so steps a killed run logged past it are
    not doubled. Needs the ``tensorboard`` package (``pip install 'medseg[tensorboard]'``); ``tensorboard --logdir
    RUN`` shows it.

    Args:
        log_dir: The event files' folder (created).
        purge_step: On resume: events at this step (epoch) and later, left by a killed run, are dropped.

    Raises:
        ConfigError: ``EXTRA_MISSING`` when the ``tensorboard`` package is not installed.
    """

    run_id: str | None = None
    uri: str = ""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        require_extra("tensorboard", "tensorboard", "tracking.tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)

    def log_params(self, params: dict[str, Any]) -> None:
        """The parameters as one markdown table (text tab, tag ``params``)."""
        rows = "\n".join(f"| {k} | {str(v)[:200]} |" for k, v in params.items())
        self.writer.add_text("params", "| parameter | value |\n|---|---|\n" + rows)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            if np.isfinite(float(value)):
                self.writer.add_scalar(key, float(value), step or 0)
        self.writer.flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Artifacts are MLflow's; TensorBoard keeps none."""

    def set_tags(self, tags: dict[str, str]) -> None:
        self.writer.add_text("tags", "\n".join(f"{k}: {v}" for k, v in tags.items()))

    def log_overlay(self, case_id: str, image: np.ndarray, pred: np.ndarray, ref: np.ndarray, affine: np.ndarray,
                    labels: dict[int, str], step: int) -> None:
        """The validation case's reference (blue) and prediction (orange) contours on its image, as the reports draw
        them (:mod:`medseg.reporting.overlays`), under ``validation/<case ID>`` at ``step``.

        Args:
            image: ``(C, *spatial)`` preprocessed intensities; ``pred``/``ref``: ``(*spatial)`` label maps.
            affine: The preprocessed grid's voxel-to-world affine (3D planes are drawn in radiological convention).
        """
        from PIL import Image

        from medseg.reporting.overlays import overlay_2d, overlay_3d

        names = {k: v for k, v in labels.items() if k != 0}
        if pred.ndim == 3:
            png, _ = overlay_3d(image[0], ref, pred, affine, names)
        else:
            png, _ = overlay_2d(image, ref, pred, names)
        picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))  # (H, W, 3) uint8
        self.writer.add_image(f"validation/{case_id}", picture, step, dataformats="HWC")
        self.writer.flush()

    def log_graph(self, net: Any, example: Any) -> None:
        """The network's graph for ``example`` input; a network ``torch.jit.trace`` cannot follow is logged as
        skipped (training goes on)."""
        import warnings

        import torch

        was_training = net.training
        try:  # traced in eval mode, without touching the random streams the run draws from; torch.jit's deprecation
            # and tracer warnings are TensorBoard's business, not the user's
            with torch.random.fork_rng(devices=[]), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.writer.add_graph(net.eval(), example)
        except Exception as exc:  # noqa: BLE001 - tracing fails in many network-specific ways; the graph is optional
            log.info("TensorBoard graph skipped: %s", describe(exc))
        finally:
            net.train(was_training)
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()
