"""The one in-memory image type: a channel-first array plus a 4x4 affine in world millimetres (RAS+)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medseg.errors import InputError


# The largest voxel buffer any reader allocates for one image (decompression bombs, corrupt headers): NIfTI,
# DICOM, ITK formats and 2D pictures all refuse, before allocating, an image that would need more.
MAX_VOLUME_BYTES = 16 * 1024**3

# DICOM and ITK describe positions in LPS (x to the patient's left, y posterior); Volume affines are RAS+.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_orthogonal(affine: np.ndarray, ndim: int = 3, tolerance: float = 1e-3) -> bool:
    """True when the first ``ndim`` axes of ``affine`` are non-degenerate and mutually orthogonal (no shear)."""
    axes = np.asarray(affine, dtype=np.float64)[:ndim, :ndim]
    norms = np.linalg.norm(axes, axis=0)
    if (norms < 1e-9).any():
        return False
    unit = axes / norms
    return bool(np.abs(unit.T @ unit - np.eye(ndim)).max() <= tolerance)


@dataclass
class Volume:
    """An image or label map with its geometry.

    Attributes:
        array: Voxel data, channel first: ``(C, X, Y, Z)`` for volumes, ``(C, X, Y)`` for 2D images.
        affine: ``(4, 4)`` matrix mapping voxel indices ``(i, j, k, 1)`` to RAS+ world coordinates in mm
            (the NIfTI/nibabel convention). 2D images use the first two columns; the third is the
            out-of-plane axis.
        meta: Non-identifying metadata (source format, which NIfTI transform was used, ...). Never holds
            patient identifiers.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise InputError("AFFINE_INVALID", f"affine must be 4x4, found shape {self.affine.shape}")
        if self.array.ndim not in (3, 4):
            raise InputError(
                "SHAPE_INVALID", f"array must be channel-first (C, X, Y[, Z]), found {self.array.ndim} dimensions"
            )

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Spatial size ``(X, Y[, Z])``."""
        return tuple(int(s) for s in self.array.shape[1:])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel spacing in mm along each spatial axis (column norms of the affine)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(s) for s in norms[: len(self.spatial_shape)])

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (3D; see :attr:`unit_volume_ml` for 2D pictures)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def unit_volume_ml(self) -> float:
        """What one element measures: a voxel's volume in mL (3D), or a pixel's area in cm^2 (2D; read as mL of a
        1 cm thick slab). The unit of label volumes in reports and ``--stats``."""
        if len(self.spatial_shape) == 3:
            return self.voxel_volume_ml
        return float(abs(np.linalg.det(self.affine[:2, :2]))) / 100.0

    def with_array(self, array: np.ndarray, **meta: Any) -> "Volume":
        """Returns a new volume on the same grid with different voxel data (e.g. a label map)."""
        if tuple(array.shape[1:]) != self.spatial_shape:
            raise InputError(
                "SHAPE_MISMATCH", f"array spatial shape {tuple(array.shape[1:])} differs from {self.spatial_shape}"
            )
        return Volume(array, self.affine.copy(), {**self.meta, **meta})

    def same_grid(self, other: "Volume", atol_mm: float = 1e-4) -> bool:
        """True when both volumes have the same spatial shape and affine (within ``atol_mm``)."""
        return self.spatial_shape == other.spatial_shape and bool(np.allclose(self.affine, other.affine, atol=atol_mm))
