"""Reading any supported file by its ending, and listing a folder's cases by ID."""

from __future__ import annotations

from pathlib import Path

from medseg.errors import InputError
from medseg.io.image2d import is_image2d, read_image2d
from medseg.io.nifti import is_nifti, read_nifti, strip_nifti_suffix
from medseg.io.volume import Volume


def case_id(path: Path) -> str:
    """Case ID of a file: its name without the format ending (``ct_001.nii.gz`` -> ``ct_001``)."""
    return strip_nifti_suffix(path.name) if is_nifti(path) else path.stem


def is_supported(path: Path) -> bool:
    """True for files :func:`read_volume` can read."""
    return is_nifti(path) or is_image2d(path)


def read_volume(path: str | Path) -> Volume:
    """Reads a NIfTI volume or a 2D picture.

    Raises:
        InputError: ``FORMAT_UNSUPPORTED`` for other endings; the readers' own codes otherwise.
    """
    path = Path(path)
    if is_nifti(path):
        return read_nifti(path)
    if is_image2d(path):
        return read_image2d(path)
    raise InputError("FORMAT_UNSUPPORTED", f"cannot read {path.name}: expected .nii, .nii.gz, .png, .jpg or .tif")


def write_labels(volume: Volume, folder: Path, case: str, like: Path) -> Path:
    """Writes a label map beside the format of its input ``like``: NIfTI (uint8) or, for 2D pictures, PNG.

    The write is atomic (temporary file renamed into place).
    """
    import numpy as np

    from medseg.io.nifti import write_nifti

    if is_nifti(like) or len(volume.spatial_shape) == 3:
        return write_nifti(volume, folder / f"{case}.nii.gz", np.uint8)
    from PIL import Image

    from medseg.fsutil import atomic_write

    target = folder / f"{case}.png"
    image = Image.fromarray(np.ascontiguousarray(volume.array[0], dtype=np.uint8))
    return atomic_write(target, lambda tmp: image.save(tmp, format="PNG"))


def files_by_id(folder: Path) -> dict[str, Path]:
    """Supported files directly inside ``folder``, keyed by case ID (sorted)."""
    return {case_id(p): p for p in sorted(Path(folder).iterdir()) if p.is_file() and is_supported(p)}
