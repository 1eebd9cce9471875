"""The one in-memory image type: a channel-first array plus a 4x4 affine in world millimetres (RAS+)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medseg.errors import InputError

# The largest voxel buffer any reader allocates for one image (decompression bombs, corrupt headers): NIfTI,
# DICOM, ITK formats and 2D pictures all refuse, before allocating, an image that would need more.
MAX_VOLUME_BYTES = 16 * 1024**3

#: Deflate (gzip, zlib) expands a byte into at most 1032 bytes: a compressed file smaller than its announced voxels
#: divided by this cannot hold them (a tiny file announcing gigabytes), refused before any buffer is allocated.
MAX_DEFLATE_RATIO = 1032
#: Voxel types medseg segments; anything else (complex, RGB24/RGBA32 records, float16, float128) is refused.
SUPPORTED_DTYPES = tuple(np.dtype(t) for t in ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64",
                                              "int64", "float32", "float64"))


def check_voxel_dtype(dtype: np.dtype, name: str) -> None:
    """Refuses voxel types medseg cannot segment as numbers (complex, structured RGB, long double ...).

    Raises:
        InputError: ``IMAGE_DTYPE_UNSUPPORTED``.
    """
    dtype = np.dtype(dtype)
    if dtype.newbyteorder("=") not in SUPPORTED_DTYPES:
        kind = {"c": "complex", "V": "a record (e.g. RGB24)"}.get(dtype.kind, str(dtype))
        raise InputError("IMAGE_DTYPE_UNSUPPORTED", f"{name}: voxels of type {kind} ({dtype.str}) cannot be segmented",
                         "convert to a real scalar type (int16, float32, ...), one channel per colour or component")


def available_bytes() -> int:
    """Memory this machine can give a new allocation now (psutil's ``available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def check_allocation(nbytes: int, what: str, max_bytes: int = MAX_VOLUME_BYTES, code: str = "IMAGE_TOO_LARGE",
                     hint: str = "refused before allocating (corrupt header or decompression bomb?)") -> None:
    """Refuses, before allocating, a buffer above the cap or above the memory available now.

    Raises:
        InputError: ``code`` (``IMAGE_TOO_LARGE`` by default).
    """
    if nbytes > max_bytes:
        raise InputError(code, f"{what}: {nbytes / 1e9:.1f} GB of voxels, above the cap of {max_bytes / 1e9:.1f} GB", hint)
    free = available_bytes()
    if nbytes > free:
        raise InputError(code, f"{what}: {nbytes / 1e9:.1f} GB of voxels, more than the {free / 1e9:.1f} GB of memory "
                         "available", "free memory, or process the image on a larger machine")


def check_announced_size(path, nbytes: int, offset: int, *, compressed: bool, max_bytes: int = MAX_VOLUME_BYTES,
                         code: str = "IMAGE_CORRUPT", file_size: int | None = None) -> None:
    """Compares the voxel bytes a header announces with what the data file can hold, before allocating: a raw file
    must be at least ``offset + nbytes`` long, a deflate-compressed one at least ``nbytes / 1032``.

    Raises:
        InputError: ``IMAGE_TOO_LARGE`` (cap, available memory); ``code`` when the file is too small.
    """
    from pathlib import Path

    name = Path(path).name
    check_allocation(nbytes, name, max_bytes)
    size = Path(path).stat().st_size if file_size is None else file_size
    if not compressed and size < offset + nbytes:
        raise InputError(code, f"{name}: the header announces {offset + nbytes} bytes, the file has {size}",
                         "the file is truncated (or its header is damaged); re-copy it")
    if compressed and size * MAX_DEFLATE_RATIO + (1 << 20) < offset + nbytes:
        raise InputError(code, f"{name}: the header announces {nbytes / 1e6:.1f} MB of voxels, but {size} compressed "
                         f"bytes cannot hold more than {size * MAX_DEFLATE_RATIO / 1e6:.1f} MB",
                         "the header is damaged, or the file a decompression bomb; re-copy it")


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
        if not np.isfinite(self.affine).all():
            raise InputError("AFFINE_NONFINITE", "the image's voxel-to-world transform holds NaN or Inf",
                             "the file's geometry is damaged; re-export it")
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

    def with_array(self, array: np.ndarray, **meta: Any) -> Volume:
        """Returns a new volume on the same grid with different voxel data (e.g. a label map)."""
        if tuple(array.shape[1:]) != self.spatial_shape:
            raise InputError(
                "SHAPE_MISMATCH", f"array spatial shape {tuple(array.shape[1:])} differs from {self.spatial_shape}"
            )
        return Volume(array, self.affine.copy(), {**self.meta, **meta})

    def same_grid(self, other: Volume, atol_mm: float = 1e-4) -> bool:
        """True when both volumes have the same spatial shape and affine (within ``atol_mm``)."""
        return self.spatial_shape == other.spatial_shape and bool(np.allclose(self.affine, other.affine, atol=atol_mm))
