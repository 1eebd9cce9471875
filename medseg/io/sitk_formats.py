"""NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) through SimpleITK, with exact geometry.

ITK stores origin, spacing and a direction matrix in LPS; :class:`Volume` uses a RAS affine. Array axes follow
ITK's index order ``(i, j, k)`` = ``(X, Y, Z)``; multi-component (vector) pixels become channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.volume import LPS_TO_RAS, MAX_VOLUME_BYTES, Volume, is_orthogonal

SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def is_sitk_format(path: Path) -> bool:
    """True for NRRD and MetaImage file names."""
    return path.suffix.lower() in SITK_SUFFIXES


def _header_size(reader) -> tuple[tuple[int, ...], int]:
    size = tuple(int(s) for s in reader.GetSize())
    components = int(reader.GetNumberOfComponents())
    return size, components


def read_sitk(path: str | Path, max_bytes: int = MAX_VOLUME_BYTES) -> Volume:
    """Reads a NRRD or MetaImage file.

    The header is read first: zero-size dimensions, more than 3 spatial dimensions and volumes above
    ``max_bytes`` are refused before any voxel buffer is allocated.

    Raises:
        InputError: ``PATH_NOT_FOUND``, ``IMAGE_CORRUPT``, ``SHAPE_INVALID``, ``IMAGE_TOO_LARGE``,
            ``IMAGE_NONFINITE``, ``AFFINE_SHEARED``.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError("PATH_NOT_FOUND", f"image not found: {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError("IMAGE_CORRUPT", f"cannot read the header of {path.name}: {_first_line(exc)}") from None
    size, components = _header_size(reader)
    if len(size) not in (2, 3) or 0 in size:
        raise InputError("SHAPE_INVALID", f"{path.name}: expected a 2D or 3D image, header says size {size}")
    itemsize = np.dtype(sitk.GetArrayViewFromImage(sitk.Image(1, 1, reader.GetPixelID())).dtype).itemsize
    nbytes = int(np.prod(size)) * components * itemsize
    if nbytes > max_bytes:
        raise InputError("IMAGE_TOO_LARGE", f"{path.name}: {nbytes / 1e9:.1f} GB exceeds the cap of {max_bytes / 1e9:.1f} GB")
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError("IMAGE_CORRUPT", f"cannot read the voxels of {path.name}: {_first_line(exc)}") from None
    data = sitk.GetArrayFromImage(image)  # (Z, Y, X[, C]) or (Y, X[, C])
    ndim = image.GetDimension()
    if components > 1:
        data = np.moveaxis(data, -1, 0)  # (C, Z, Y, X)
    else:
        data = data[None]
    data = np.ascontiguousarray(np.moveaxis(data, range(1, ndim + 1), range(ndim, 0, -1)))  # (C, X, Y[, Z])
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise InputError("IMAGE_NONFINITE", f"{path.name} contains NaN or Inf voxels", "fix the file before use")
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    if not is_orthogonal(direction, ndim):
        raise InputError("AFFINE_SHEARED", f"{path.name}: the direction matrix is not orthonormal")
    lps = np.eye(4)
    lps[:ndim, :ndim] = direction * np.array(image.GetSpacing())
    lps[:ndim, 3] = image.GetOrigin()
    if ndim == 2:
        lps[2, 2] = 1.0
    meta = {"source_format": path.suffix.lower().lstrip("."), "source_dtype": str(data.dtype)}
    return Volume(data, LPS_TO_RAS @ lps, meta)


def write_sitk(volume: Volume, path: str | Path, dtype: np.dtype | type | None = None, compress: bool = True) -> Path:
    """Writes a volume as NRRD or MetaImage with its exact geometry; atomic (temporary file renamed)."""
    import SimpleITK as sitk

    from medseg.fsutil import atomic_write

    path = Path(path)
    if not is_sitk_format(path) or path.suffix.lower() in (".nhdr", ".mhd"):
        raise InputError("OUTPUT_NAME_INVALID", f"write .nrrd or .mha (single-file formats), not {path.name}")
    array = volume.array if dtype is None else volume.array.astype(dtype, copy=False)
    ndim = array.ndim - 1
    data = np.moveaxis(array, range(1, ndim + 1), range(ndim, 0, -1))  # (C, Z, Y, X)
    if data.shape[0] == 1:
        image = sitk.GetImageFromArray(np.ascontiguousarray(data[0]))
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(data, 0, -1)), isVector=True)
    lps = LPS_TO_RAS @ volume.affine
    axes = lps[:ndim, :ndim]
    spacing = np.linalg.norm(axes, axis=0)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in lps[:ndim, 3]))
    image.SetDirection(tuple(float(d) for d in (axes / spacing).ravel()))

    def write(tmp: Path) -> None:
        sitk.WriteImage(image, str(tmp), useCompression=compress)

    return atomic_write(path, write, suffix=path.suffix.lower())


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(exc).__name__
