"""Label maps, series and label objects for the RTSTRUCT/SEG reading tests (tests/io/test_dicom_labels*.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dicom_helpers import rotated_affine, series

from medseg.io.dicom import read_dicom
from medseg.io.dicom_derived import Producer
from medseg.io.dicom_seg import write_dicom_seg
from medseg.io.rtstruct import write_rtstruct

PRODUCER = Producer("organ3d", "unet", "ab12" * 16, "9.9.9", "1.2.826.0.1.3680043.10.777.")


def shapes(shape) -> np.ndarray:
    """Label 1: a ring (a hole) with an island in the hole; label 2: two boxes, one touching the image border."""
    labels = np.zeros(shape, np.uint8)
    x, y = np.mgrid[: shape[0], : shape[1]]
    for z in range(1, shape[2] - 1):
        r = np.hypot(x - 20.3, y - 22.8)
        labels[..., z][(r < 12 + z % 3) & (r >= 5)] = 1
        labels[..., z][r < 2.5] = 1
        labels[..., z][(x > 36) & (y > 4) & (y < 16)] = 2
        labels[..., z][(x > 34) & (x < 44) & (y > 26 + z) & (y < 40)] = 2
    labels[3:6, 40:43, 2] = 1  # a one-row sliver and a diagonal staircase: corners for the fill rule
    for k in range(6):
        labels[10 + k, 2 + k, 3] = 2
    return labels


def study(folder: Path, labels: np.ndarray, names: dict[int, str], *, affine=None, kind="rtstruct", seed=0, **kw):
    """A series plus its label object in ``folder``; returns the series volume as read back."""
    series(folder / "ct", shape=labels.shape, affine=rotated_affine(spacing=(0.8, 0.7, 2.5)) if affine is None else affine,
           seed=seed, **kw)
    source = read_dicom(folder / "ct")
    writer = write_rtstruct if kind == "rtstruct" else write_dicom_seg
    writer(source.with_array(labels[None]), source, folder / f"{kind}.dcm", names, PRODUCER)
    return source


