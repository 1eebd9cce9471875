"""Reading any supported file by its ending, and listing a folder's cases by ID."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg.errors import InputError
from medseg.io.dicom_headers import is_dicom_file
from medseg.io.image2d import is_image2d, read_image2d
from medseg.io.nifti import is_nifti, read_nifti, strip_nifti_suffix
from medseg.io.sitk_formats import is_sitk_format, read_sitk
from medseg.io.volume import Volume

FORMATS = ".nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, .png, .jpg, .tif, .bmp, DICOM files or a DICOM series folder"


def case_id(path: Path) -> str:
    """Case ID of a file: its name without the format ending (``ct_001.nii.gz`` -> ``ct_001``)."""
    return strip_nifti_suffix(path.name) if is_nifti(path) else (path.name if path.is_dir() else path.stem)


def is_supported(path: Path) -> bool:
    """True for files :func:`read_volume` can read by their ending (DICOM files are recognised by content)."""
    return is_nifti(path) or is_image2d(path) or is_sitk_format(path)


def read_volume(path: str | Path, **dicom_options: Any) -> Volume:
    """Reads any supported image: NIfTI, NRRD/MetaImage, a 2D picture, a DICOM file, or a folder holding one
    DICOM series.

    Args:
        path: File or DICOM folder.
        **dicom_options: Passed to :func:`medseg.io.dicom.read_dicom` (``allow_tilt``, ...).

    Raises:
        InputError: ``FORMAT_UNSUPPORTED`` for other files; the readers' own codes otherwise.
    """
    path = Path(path)
    if is_nifti(path):
        return read_nifti(path)
    if is_sitk_format(path):
        return read_sitk(path)
    if is_image2d(path):
        return read_image2d(path)
    if path.is_dir() or is_dicom_file(path):
        from medseg.io.dicom import read_dicom

        return read_dicom(path, **dicom_options)
    if not path.exists():
        raise InputError("PATH_NOT_FOUND", f"input not found: {path}")
    raise InputError("FORMAT_UNSUPPORTED", f"cannot read {path.name}: expected {FORMATS}")


def files_by_id(folder: Path) -> dict[str, Path]:
    """Supported files directly inside ``folder``, keyed by case ID (sorted)."""
    return {case_id(p): p for p in sorted(Path(folder).iterdir()) if p.is_file() and is_supported(p)}


def read_channels(paths: "list[Path] | tuple[Path, ...] | list[str]", **dicom_options: Any) -> Volume:
    """Reads one image per channel (nnU-Net ``_0000``, ``_0001`` ... files) and stacks them.

    Raises:
        InputError: ``CHANNELS_GRID_MISMATCH`` when the channel files do not share one grid.
    """
    import numpy as np

    volumes = [read_volume(p, **dicom_options) for p in paths]
    first = volumes[0]
    for path, volume in zip(paths[1:], volumes[1:]):
        if not first.same_grid(volume, atol_mm=1e-3):
            raise InputError(
                "CHANNELS_GRID_MISMATCH", f"{Path(path).name} does not share the grid of {Path(paths[0]).name}",
                "all channels of a case must have the same shape, spacing, origin and direction",
            )
    if len(volumes) == 1:
        return first
    return Volume(np.concatenate([v.array for v in volumes]), first.affine, first.meta)
