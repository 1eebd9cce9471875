"""Slice-stack geometry: sort along the normal, validate, build the RAS affine, undo gantry tilt on request.

Slice spacing comes from ImagePositionPatient only (never SpacingBetweenSlices or SliceThickness). Array axes
are ``X`` = DICOM column index, ``Y`` = row index, ``Z`` = sorted slice index; the affine maps them to RAS+
millimetres (DICOM's LPS with the first two axes negated), the convention of dcm2niix and ITK.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medseg.errors import InputError
from medseg.io.volume import LPS_TO_RAS



@dataclass
class StackGeometry:
    """Validated slice stack: sorted files (or frame indices), affine, tilt correction."""

    order: list[int]
    affine: np.ndarray  # RAS
    shift_per_slice: np.ndarray | None  # in-plane (columns, rows) pixel shifts to undo gantry tilt
    tilt_degrees: float


def stack_geometry(
    positions: np.ndarray,
    orientations: np.ndarray,
    pixel_spacing: tuple[float, float],
    *,
    what: str,
    min_slices: int = 3,
    orientation_tolerance: float = 1e-3,
    spacing_tolerance: float = 0.05,
    allow_tilt: bool = False,
    instance_numbers: list[int | None] | None = None,
) -> StackGeometry:
    """Sorts and validates a stack of slices and returns its RAS affine.

    Args:
        positions: ``(N, 3)`` ImagePositionPatient (LPS mm).
        orientations: ``(N, 6)`` ImageOrientationPatient.
        pixel_spacing: ``(between rows, between columns)`` mm.
        what: Name of the series for messages (index/hash, never patient tags).
        min_slices: Fewer slices are refused (localizers).
        orientation_tolerance: Largest allowed difference between slice direction cosines.
        spacing_tolerance: Largest allowed deviation of a slice step from the median step, relative.
        allow_tilt: Resample a gantry-tilted (sheared) stack onto an orthogonal grid instead of refusing it.
        instance_numbers: For messages.

    Raises:
        InputError: ``DICOM_TOO_FEW_SLICES``, ``DICOM_ORIENTATION_INCONSISTENT``, ``DICOM_NOT_A_VOLUME``,
            ``DICOM_DUPLICATE_POSITION``, ``DICOM_SLICE_GAP``, ``DICOM_GANTRY_TILT``.
    """
    n = len(positions)
    if n < min_slices:
        raise InputError(
            "DICOM_TOO_FEW_SLICES", f"{what} has {n} slice(s); at least {min_slices} are needed for a volume",
            "localizers and single images are not segmented as volumes",
        )
    deviation = float(np.abs(orientations - orientations[0]).max())
    if deviation > orientation_tolerance:
        raise InputError(
            "DICOM_ORIENTATION_INCONSISTENT",
            f"{what}: slice orientations differ by up to {deviation:.4f} (tolerance {orientation_tolerance})",
            "the series mixes image planes; export each plane as its own series",
        )
    row, col = orientations[0, :3], orientations[0, 3:]
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    if abs(float(row @ col)) > 1e-3:
        raise InputError("DICOM_ORIENTATION_INVALID", f"{what}: row and column directions are not orthogonal")
    normal = np.cross(row, col)
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    distance, positions = distance[order], positions[order]
    extent = float(distance[-1] - distance[0])
    if extent < 1e-3:
        raise InputError(
            "DICOM_NOT_A_VOLUME", f"{what}: all {n} slices lie at one position", "this is a time series or repeats"
        )
    steps = np.diff(distance)
    numbers = [instance_numbers[i] for i in order] if instance_numbers else [None] * n
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
    bad = np.flatnonzero(np.abs(steps - median) > spacing_tolerance * median)
    if bad.size:
        k = int(bad[0])
        raise InputError(
            "DICOM_SLICE_GAP",
            f"{what}: uneven slice spacing: step between sorted slices {k} and {k + 1} (instance numbers "
            f"{numbers[k]} and {numbers[k + 1]}) is {steps[k]:.3f} mm, the median step is {median:.3f} mm "
            f"({bad.size} uneven step(s) in total)",
            "a slice is probably missing; re-export the complete series",
        )
    spacing = extent / (n - 1)
    in_plane = positions - positions[0] - np.outer(distance - distance[0], normal)  # (N, 3) perpendicular offsets
    offset = float(np.linalg.norm(in_plane, axis=1).max())
    tilt = float(np.degrees(np.arctan2(np.linalg.norm(in_plane[-1]), extent)))
    shifts = None
    if offset > 1e-2:
        if not allow_tilt:
            raise InputError(
                "DICOM_GANTRY_TILT",
                f"{what}: slices are sheared (gantry tilt about {tilt:.2f} degrees; in-plane offset up to "
                f"{offset:.2f} mm)",
                "pass --allow-tilt to resample onto an orthogonal grid (recorded in the output metadata)",
            )
        # in-plane offset of each slice in pixels along (columns, rows)
        shifts = np.stack([in_plane @ row / pixel_spacing[1], in_plane @ col / pixel_spacing[0]], axis=1)
    lps = np.eye(4)
    lps[:3, 0] = row * pixel_spacing[1]
    lps[:3, 1] = col * pixel_spacing[0]
    lps[:3, 2] = normal * spacing
    lps[:3, 3] = positions[0]
    return StackGeometry([int(i) for i in order], LPS_TO_RAS @ lps, shifts, tilt if shifts is not None else 0.0)


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
