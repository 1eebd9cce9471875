"""Slice-stack geometry: sort along the normal, validate, build the RAS affine, undo gantry tilt on request.

Slice spacing comes from ImagePositionPatient only (never SpacingBetweenSlices or SliceThickness). Array axes
are ``X`` = DICOM column index, ``Y`` = row index, ``Z`` = sorted slice index; the affine maps them to RAS+
millimetres (DICOM's LPS with the first two axes negated), the convention of dcm2niix and ITK.

Real scanners write positions as decimal strings rounded to a few digits, and their slice steps jitter, so the
checks have tolerances that real series pass and real defects do not:

* **in-plane drift** (each slice's offset from the line through the first slice along the normal): up to
  ``drift_px`` (0.25) of the smaller pixel spacing is jitter, and the stack is treated as orthogonal
  (every voxel then lies within a quarter pixel of its true position); more is a sheared stack (gantry tilt):
  refused as ``DICOM_GANTRY_TILT`` unless resampling is allowed. A real 0.5 degree tilt over 100 mm is 0.87 mm.
* **slice steps**: each step may differ from the median step by ``step_relative`` (5 %) of it, or by
  ``step_floor_mm`` (0.1 mm) where that is larger, but never by half a step: a missing slice (a step of two
  medians) is always refused as ``DICOM_SLICE_GAP``.

For comparison: dicom2nifti refuses a step whose vector differs from the first step by more than 5 % + 0.1 mm
(``numpy.allclose(rtol=0.05, atol=0.1)``) and a stack whose first-to-last direction is off the normal by more
than 0.05 in any direction cosine (about 3 degrees); dcm2niix warns when a step differs from the first by more
than 0.2 mm and estimates tilt from the first-to-last slice vector. Every tolerance can be changed
(:class:`DicomTolerances`, config ``inference.dicom``; the defaults above live in ``configs/base.yaml`` only). The measured drift and step spread are
returned (:class:`StackGeometry`) and recorded in the volume's metadata (``slice_geometry``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.io.volume import LPS_TO_RAS


@dataclass(frozen=True)
class DicomTolerances:
    """What a slice stack may deviate by and still be one volume (``inference.dicom`` in the config; the
    ``--dicom KEY=VALUE`` options of ``medseg predict`` and ``medseg convert``). No defaults here: they are
    ``inference.dicom`` of ``configs/base.yaml`` (:func:`default_tolerances`)."""

    min_slices: int  # fewer slices are refused (localizers)
    orientation: float  # largest difference between the slices' direction cosines
    step_relative: float  # largest |step - median step| / median step ...
    step_floor_mm: float  # ... or this many mm where larger (capped at half a step)
    drift_px: float  # in-plane drift (pixels of the smaller spacing) treated as jitter

    def __post_init__(self) -> None:
        if self.min_slices < 1 or self.orientation <= 0 or not 0 <= self.step_relative < 0.5 \
                or self.step_floor_mm < 0 or self.drift_px < 0:
            raise ValueError(f"invalid DICOM tolerances: {self}")

    @classmethod
    def from_mapping(cls, values: dict) -> DicomTolerances:
        """From a mapping of field names (a config section); unknown names and bad values raise ``ValueError``."""
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown DICOM tolerance(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        typed: dict[str, Any] = {k: (int(v) if k == "min_slices" else float(v)) for k, v in values.items()}
        return cls(**typed)



@dataclass
class StackGeometry:
    """Validated slice stack: sorted files (or frame indices), affine, tilt correction."""

    order: list[int]
    affine: np.ndarray  # RAS
    shift_per_slice: np.ndarray | None  # in-plane (columns, rows) pixel shifts to undo gantry tilt
    tilt_degrees: float
    drift_mm: float = 0.0  # largest in-plane offset of a slice from the normal through the first slice
    drift_px: float = 0.0  # the same in pixels (of the smaller pixel spacing)
    step_spread: float = 0.0  # largest |step - median step| / median step
    median_step_mm: float = 0.0

    def record(self) -> dict:
        """What the output metadata records about the stack's geometry (``slice_geometry``)."""
        return {"inplane_drift_mm": round(self.drift_mm, 4), "inplane_drift_px": round(self.drift_px, 4),
                "step_spread_pct": round(100 * self.step_spread, 3), "median_step_mm": round(self.median_step_mm, 4),
                "gantry_tilt_degrees": round(self.tilt_degrees, 3)}


@functools.cache
def default_tolerances() -> DicomTolerances:
    """The tolerances of ``configs/base.yaml`` (``inference.dicom``), their one home.

    Examples:
        >>> default_tolerances().min_slices, default_tolerances().drift_px
        (3, 0.25)
    """
    return configured_tolerances()


def configured_tolerances(cfg: Any = None, overrides: Sequence[str] = ()) -> DicomTolerances:
    """The tolerances of a configuration (``base.yaml``'s when None) with ``--dicom KEY=VALUE`` overrides.

    Raises:
        ConfigError: ``CONFIG_BAD_OVERRIDE``, ``CONFIG_UNKNOWN_KEY`` or ``CONFIG_INVALID_VALUE``.
    """
    from medseg.config import dicom_settings

    return DicomTolerances(**dicom_settings(cfg, overrides).model_dump())


def _plane(orientations: np.ndarray, what: str, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """The unit row and column directions shared by every slice.

    Raises:
        InputError: ``DICOM_ORIENTATION_INCONSISTENT``, ``DICOM_ORIENTATION_INVALID``.
    """
    deviation = float(np.abs(orientations - orientations[0]).max())
    if deviation > tolerance:
        raise InputError(
            "DICOM_ORIENTATION_INCONSISTENT",
            f"{what}: slice orientations differ by up to {deviation:.4f} (tolerance {tolerance})",
            "the series mixes image planes; export each plane as its own series",
        )
    row, col = orientations[0, :3], orientations[0, 3:]
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    if abs(float(row @ col)) > 1e-3:
        raise InputError("DICOM_ORIENTATION_INVALID", f"{what}: row and column directions are not orthogonal")
    return row, col


def _even_steps(distance: np.ndarray, numbers: list, what: str, t: DicomTolerances) -> tuple[np.ndarray, float]:
    """The steps between sorted slice positions and their median, checked for repeats and gaps.

    Raises:
        InputError: ``DICOM_DUPLICATE_POSITION``, ``DICOM_SLICE_GAP``.
    """
    steps = np.diff(distance)
    if (steps < 1e-3).any():
        k = int(np.argmax(steps < 1e-3))
        dup = int((steps < 1e-3).sum())
        raise InputError(
            "DICOM_DUPLICATE_POSITION",
            f"{what}: {dup} slice(s) repeat a position (first at sorted slices {k}/{k + 1}, "
            f"instance numbers {numbers[k]}/{numbers[k + 1]}, {distance[k]:.2f} mm along the normal)",
            "the series may hold several echoes, phases or repeats; split it before conversion",
        )
    median = float(np.median(steps))
    allowed = max(t.step_relative * median, min(t.step_floor_mm, 0.5 * median))
    bad = np.flatnonzero(np.abs(steps - median) > allowed)
    if bad.size:
        k = int(bad[0])
        raise InputError(
            "DICOM_SLICE_GAP",
            f"{what}: uneven slice spacing: step between sorted slices {k} and {k + 1} (instance numbers "
            f"{numbers[k]} and {numbers[k + 1]}) is {steps[k]:.3f} mm, the median step is {median:.3f} mm "
            f"({bad.size} uneven step(s) in total)",
            "a slice is probably missing; re-export the complete series",
        )
    return steps, median


def stack_geometry(
    positions: np.ndarray,
    orientations: np.ndarray,
    pixel_spacing: tuple[float, float],
    *,
    what: str,
    tolerances: DicomTolerances | None = None,
    allow_tilt: bool = False,
    instance_numbers: list[int | None] | None = None,
) -> StackGeometry:
    """Sorts and validates a stack of slices and returns its RAS affine.

    Args:
        positions: ``(N, 3)`` ImagePositionPatient (LPS mm).
        orientations: ``(N, 6)`` ImageOrientationPatient.
        pixel_spacing: ``(between rows, between columns)`` mm.
        what: Name of the series for messages (index/hash, never patient tags).
        tolerances: Smallest slice count, orientation, step and drift tolerances (:class:`DicomTolerances`; None:
            :func:`default_tolerances`).
        allow_tilt: Resample a gantry-tilted (sheared) stack onto an orthogonal grid instead of refusing it.
        instance_numbers: For messages.

    Raises:
        InputError: ``DICOM_TOO_FEW_SLICES``, ``DICOM_ORIENTATION_INCONSISTENT``, ``DICOM_NOT_A_VOLUME``,
            ``DICOM_DUPLICATE_POSITION``, ``DICOM_SLICE_GAP``, ``DICOM_GANTRY_TILT``.
    """
    n = len(positions)
    t = tolerances or default_tolerances()
    if n < t.min_slices:
        raise InputError(
            "DICOM_TOO_FEW_SLICES", f"{what} has {n} slice(s); at least {t.min_slices} are needed for a volume",
            "localizers and single images are not segmented as volumes",
        )
    row, col = _plane(orientations, what, t.orientation)
    normal = np.cross(row, col)
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    distance, positions = distance[order], positions[order]
    extent = float(distance[-1] - distance[0])
    if extent < 1e-3:
        raise InputError(
            "DICOM_NOT_A_VOLUME", f"{what}: all {n} slices lie at one position", "this is a time series or repeats"
        )
    numbers = [instance_numbers[i] for i in order] if instance_numbers else [None] * n
    steps, median = _even_steps(distance, numbers, what, t)
    spacing = extent / (n - 1)
    in_plane = positions - positions[0] - np.outer(distance - distance[0], normal)  # (N, 3) perpendicular offsets
    offset = float(np.linalg.norm(in_plane, axis=1).max())
    drift_px = offset / min(pixel_spacing)
    tilt = float(np.degrees(np.arctan2(np.linalg.norm(in_plane[-1]), extent)))
    shifts = None
    if drift_px > t.drift_px:
        if not allow_tilt:
            raise InputError(
                "DICOM_GANTRY_TILT",
                f"{what}: slices are sheared (gantry tilt about {tilt:.2f} degrees; in-plane offset up to "
                f"{offset:.2f} mm = {drift_px:.2f} pixel, above the {t.drift_px} pixel tolerance)",
                "pass --allow-tilt to resample onto an orthogonal grid (recorded in the output metadata)",
            )
        # in-plane offset of each slice in pixels along (columns, rows)
        shifts = np.stack([in_plane @ row / pixel_spacing[1], in_plane @ col / pixel_spacing[0]], axis=1)
    lps = np.eye(4)
    lps[:3, 0] = row * pixel_spacing[1]
    lps[:3, 1] = col * pixel_spacing[0]
    lps[:3, 2] = normal * spacing
    lps[:3, 3] = positions[0]
    spread = float(np.abs(steps - median).max() / median)
    return StackGeometry([int(i) for i in order], LPS_TO_RAS @ lps, shifts, tilt if shifts is not None else 0.0,
                         offset, drift_px, spread, median)


def untilt(array: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Moves each slice ``k`` of ``(C, X, Y, Z)`` by ``-shifts[k]`` pixels (linear interpolation)."""
    from scipy import ndimage

    out = np.empty(array.shape, dtype=np.float32)
    for k in range(array.shape[-1]):
        for c in range(array.shape[0]):
            out[c, :, :, k] = ndimage.shift(
                array[c, :, :, k].astype(np.float32), (-shifts[k, 0], -shifts[k, 1]), order=1, mode="nearest"
            )
    return out
