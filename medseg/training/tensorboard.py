"""TensorBoard beside MLflow (``tracking.tensorboard: true`` or ``medseg train --tensorboard DIR``).

:class:`TensorBoardTracker` implements the :class:`medseg.training.tracker.Tracker` protocol with
``torch.utils.tensorboard``'s ``SummaryWriter`` and two additions the trainer looks for: :meth:`log_overlay` (the first
validation case's prediction and reference on its image, every validation) and :meth:`log_graph` (the network, where
``torch.jit.trace`` follows it). Every metric MLflow gets is a scalar here under the same name and step (the epoch):
``train_loss``, ``lr``, ``epoch_time_s``, ``samples_per_s``, ``val_dice_<label>``, ``val_dice_mean``, ....

Only rank 0 of a torchrun job writes (:func:`medseg.workflow.open_run_tracker` gives other ranks a null tracker).
A resumed run purges the events after its last checkpoint, so steps a killed run logged past it are not doubled.
Needs the ``tensorboard`` package (``pip install 'medseg[tensorboard]'``); ``tensorboard --logdir RUN`` shows it.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import describe, require_extra

log = logging.getLogger(__name__)


class TensorBoardTracker:
    """Writes a run's scalars, parameters, validation overlays and graph as TensorBoard event files.

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
