"""One record of how a prediction run behaves, built from the model's configuration and a command's flags.

``medseg predict`` and ``medseg serve`` only parse their flags and call :func:`prediction_settings`: the DICOM stack
tolerances (``inference.dicom`` with ``--dicom KEY=VALUE``), the PACS settings and series selection (``pacs`` and
``inference.series_selection`` with ``--pacs``/``--select``), the UID root of new DICOM objects and the run's
switches all come from here, so a library caller gets the same run as the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medseg.config import Config, PacsConfig, SeriesSelectionConfig, with_overrides
from medseg.inference.discovery import parse_shard
from medseg.inference.runner import RunOptions
from medseg.io.dicom_geometry import configured_tolerances


@dataclass(frozen=True)
class PredictionSettings:
    """Everything a prediction run needs besides the network and the paths."""

    run: RunOptions
    pacs: PacsConfig
    selection: SeriesSelectionConfig


def prediction_settings(cfg: Config, *, dicom: Sequence[str] = (), pacs: Sequence[str] = (), select: Sequence[str] = (),
                        shard: str = "0/1", **flags: Any) -> PredictionSettings:
    """The run record of a model's configuration ``cfg`` and a command's flags.

    Args:
        cfg: The (first) model's configuration.
        dicom: ``--dicom KEY=VALUE`` overrides of ``inference.dicom``.
        pacs: ``--pacs KEY=VALUE`` overrides of ``pacs``.
        select: ``--select KEY=VALUE`` overrides of ``inference.series_selection``.
        shard: ``i/n`` (``--shard``).
        **flags: The other :class:`RunOptions` fields (``overwrite``, ``output_type``, ``qc`` ...).

    Raises:
        ConfigError: a bad override; InputError: ``SHARD_INVALID``.

    Examples:
        >>> from medseg.config import load_config
        >>> s = prediction_settings(load_config("smoke"), dicom=["min_slices=2"], pacs=["backoff_s=0.5"],
        ...                         shard="1/4", output_type="nifti,nrrd")
        >>> s.run.dicom.min_slices, s.run.shard, s.run.output_type, s.pacs.backoff_s
        (2, (1, 4), 'nifti,nrrd', 0.5)
    """
    settings = with_overrides(with_overrides(cfg, "pacs", pacs, "--pacs"), "inference.series_selection", select, "--select")
    run = RunOptions(shard=parse_shard(shard), dicom=configured_tolerances(cfg, dicom), uid_root=settings.pacs.uid_root, **flags)
    return PredictionSettings(run, settings.pacs, settings.inference.series_selection)
