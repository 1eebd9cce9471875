"""NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) through SimpleITK, with exact geometry.

ITK stores origin, spacing and a direction matrix in LPS; :class:`Volume` uses a RAS affine. Array axes follow
ITK's index order ``(i, j, k)`` = ``(X, Y, Z)``; multi-component (vector) pixels become channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import InputError, describe, require_file
from medseg.io.volume import (
    LPS_TO_RAS,
    MAX_VOLUME_BYTES,
    Volume,
    check_allocation,
    check_announced_size,
    check_voxel_dtype,
    is_orthogonal,
)

SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def is_sitk_format(path: Path) -> bool:
    """True for NRRD and MetaImage file names."""
    return path.suffix.lower() in SITK_SUFFIXES


def _header_size(reader) -> tuple[tuple[int, ...], int]:
    size = tuple(int(s) for s in reader.GetSize())
    components = int(reader.GetNumberOfComponents())
    return size, components


@dataclass
class DataFiles:
    """Where a NRRD/MetaImage header keeps its voxels: the files (the header itself when attached), whether they
    are deflate-compressed (True), raw (False) or in a form whose size says nothing (None: bzip2, text)."""

    files: list[Path]
    compressed: bool | None


def _header_fields(path: Path) -> tuple[dict[str, str], list[str]]:
    """``{lower-case key: value}`` of a NRRD (``key: value``) or MetaImage (``Key = Value``) header and the lines
    after a ``LIST`` data file entry; only the first 64 KiB are read."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16).decode("latin-1")
    nrrd = head.startswith("NRRD")
    fields: dict[str, str] = {}
    lines = head.splitlines()
    for i, line in enumerate(lines[1:] if nrrd else lines, start=1 if nrrd else 0):
        if nrrd and not line.strip():
            break
        if nrrd and line.startswith("#"):
            continue
        key, sep, value = line.partition(":=" if ":=" in line and nrrd else (":" if nrrd else "="))
        if not sep:
            continue
        key = key.strip().lower().replace(" ", "")
        fields[key] = value.strip()
        if key in ("datafile", "elementdatafile"):
            return fields, [ln.strip() for ln in lines[i + 1:] if ln.strip()]
    return fields, []


def _pattern_files(base: Path, spec: str) -> list[Path] | None:
    """``"slice%03d.raw 1 10 1"`` -> the files it names (None when ``spec`` is not a pattern)."""
    parts = spec.split()
    if len(parts) < 4 or "%" not in parts[0]:
        return None
    try:
        first, last, step = int(parts[1]), int(parts[2]), int(parts[3])
        if step == 0 or abs(last - first) // abs(step) > 100_000:
            return []
        return [base / (parts[0] % k) for k in range(first, last + (1 if step > 0 else -1), step)]
    except (ValueError, TypeError):
        return []


def data_files(path: Path) -> DataFiles:
    """The voxel files a NRRD/MetaImage header names (see :class:`DataFiles`)."""
    fields, rest = _header_fields(path)
    base = path.parent
    if path.suffix.lower() in (".nrrd", ".nhdr"):
        spec = fields.get("datafile", "")
        encoding = fields.get("encoding", "raw").lower()
        compressed = False if encoding == "raw" else True if encoding in ("gzip", "gz") else None
    else:
        spec = fields.get("elementdatafile", "LOCAL")
        compressed = fields.get("compresseddata", "false").lower() == "true"
    if not spec or spec.upper() == "LOCAL":
        return DataFiles([path], compressed)
    if spec.split()[0].upper() == "LIST":
        return DataFiles([base / name for name in rest], compressed)
    pattern = _pattern_files(base, spec)
    return DataFiles(pattern if pattern is not None else [base / spec], compressed)


def check_data_files(path: Path, nbytes: int, max_bytes: int) -> None:
    """Before SimpleITK allocates: every voxel file a header names is a regular file that can hold the announced
    voxels (``/dev/zero``, pipes and links to nowhere are refused; a raw file shorter than the voxels, or a deflate
    stream too short to expand to them, is refused).

    Raises:
        InputError: ``INPUT_UNREADABLE``, ``IMAGE_CORRUPT``, ``IMAGE_TOO_LARGE``.
    """
    check_allocation(nbytes, path.name, max_bytes)
    found = data_files(path)
    if not found.files:
        raise InputError("IMAGE_CORRUPT", f"{path.name}: the header names no readable data file")
    total = 0
    for f in found.files:
        require_file(f, f"data file of {path.name}:")
        total += f.stat().st_size
    if found.compressed is not None:
        check_announced_size(path, nbytes, 0, compressed=found.compressed, max_bytes=max_bytes, file_size=total)


def read_sitk(path: str | Path, max_bytes: int = MAX_VOLUME_BYTES) -> Volume:
    """Reads a NRRD or MetaImage file.

    The header is read first: zero-size dimensions, more than 3 spatial dimensions, complex voxels, volumes above
    ``max_bytes`` or the memory available, and data files that cannot hold what the header announces (or are not
    regular files: ``data file: /dev/zero``) are refused before any voxel buffer is allocated.

    Raises:
        InputError: ``PATH_NOT_FOUND``, ``INPUT_UNREADABLE``, ``IMAGE_CORRUPT``, ``SHAPE_INVALID``,
            ``IMAGE_TOO_LARGE``, ``IMAGE_DTYPE_UNSUPPORTED``, ``IMAGE_NONFINITE``, ``AFFINE_SHEARED``,
            ``AFFINE_NONFINITE``.
    """
    import SimpleITK as sitk

    path = require_file(path, "image")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError("IMAGE_CORRUPT", f"cannot read the header of {path.name}: {_first_line(exc, path)}") from None
    size, components = _header_size(reader)
    if len(size) not in (2, 3) or min(size) <= 0:
        raise InputError("SHAPE_INVALID", f"{path.name}: expected a 2D or 3D image, header says size {size}")
    dtype = np.dtype(sitk.GetArrayViewFromImage(sitk.Image(1, 1, reader.GetPixelID())).dtype)
    check_voxel_dtype(dtype, path.name)
    nbytes = int(np.prod(size)) * components * dtype.itemsize
    check_data_files(path, nbytes, max_bytes)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError("IMAGE_CORRUPT", f"cannot read the voxels of {path.name}: {_first_line(exc, path)}") from None
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
    if not (np.isfinite(direction).all() and np.isfinite(image.GetSpacing()).all() and np.isfinite(image.GetOrigin()).all()):
        raise InputError("AFFINE_NONFINITE", f"{path.name}: origin, spacing or direction holds NaN or Inf",
                         "the header is damaged; re-export the image")
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


def _first_line(exc: Exception, path: Path) -> str:
    """ITK's last message line (its first lines are source locations), without paths."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return describe(RuntimeError(lines[-1]) if lines else exc, path, limit=200).removeprefix("RuntimeError: ")
