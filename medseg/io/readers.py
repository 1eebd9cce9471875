"""Reading any supported file by its ending, and listing a folder's cases by ID."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg.errors import DatasetError, InputError, require_file
from medseg.io.dicom_headers import is_dicom_file
from medseg.io.image2d import IMAGE_2D_SUFFIXES, is_image2d, read_image2d
from medseg.io.nifti import NIFTI_SUFFIXES, is_nifti, read_nifti
from medseg.io.sitk_formats import SITK_SUFFIXES, is_sitk_format, read_sitk
from medseg.io.volume import Volume

FORMATS = ".nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, .png, .jpg, .tif, .bmp, DICOM files or a DICOM series folder"
#: Endings a case ID drops (longest first, so ``.nii.gz`` goes whole); any other dot stays in the ID.
IMAGE_SUFFIXES = tuple(sorted({*NIFTI_SUFFIXES, *SITK_SUFFIXES, *IMAGE_2D_SUFFIXES, ".dcm"}, key=len, reverse=True))
#: nnU-Net's suffix of the first (single) channel file: ``case_0000.nii.gz`` is case ``case``.
CHANNEL_0 = "_0000"


def case_id(path: str | Path) -> str:
    """The case ID of a file or folder, the one rule used everywhere (datasets, folders, evaluation, reports).

    Drops a known image ending (case-insensitive: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``,
    ``.png``, ``.jpg``, ``.jpeg``, ``.tif``, ``.tiff``, ``.bmp``, ``.dcm``) and then nnU-Net's ``_0000`` channel
    suffix; nothing else. ``ct.001.nii.gz`` -> ``ct.001``, ``case_0000.nii.gz`` -> ``case``, ``series_a`` (a
    DICOM folder) -> ``series_a``.
    """
    name = Path(path).name
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith(CHANNEL_0) and len(name) > len(CHANNEL_0):
        name = name[: -len(CHANNEL_0)]
    return name


def unique_ids(paths: list[Path], what: str) -> dict[str, Path]:
    """``{case ID: path}`` for ``paths`` (sorted by path).

    Raises:
        DatasetError: ``DATASET_DUPLICATE_ID`` naming both files when two paths give one case ID.
    """
    found: dict[str, Path] = {}
    for path in sorted(paths):
        cid = case_id(path)
        if cid in found:
            raise duplicate_id(cid, found[cid], path, what)
        found[cid] = path
    return found


def duplicate_id(cid: str, first: Path, second: Path, what: str) -> DatasetError:
    """The ``DATASET_DUPLICATE_ID`` error for two files of one case ID."""
    return DatasetError(
        "DATASET_DUPLICATE_ID", f"{first.name} and {second.name} in {what} both have case ID {cid!r}",
        "rename one of them: a case ID is the file name without its image ending (and nnU-Net's _0000)",
    )


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
    require_file(path, "input")
    raise InputError("FORMAT_UNSUPPORTED", f"cannot read {path.name}: expected {FORMATS}")


def image_entries(folder: Path) -> list[Path]:
    """Entries directly inside ``folder`` named like a supported image file, folders excepted: regular files, and
    also what cannot be read (a broken link, a link loop, a device): those are cases whose reading fails with a
    code, never inputs that silently vanish. Sorted."""
    return sorted(p for p in Path(folder).iterdir() if is_supported(p) and not p.is_dir())


def files_by_id(folder: Path) -> dict[str, Path]:
    """Supported files directly inside ``folder`` (:func:`image_entries`), keyed by case ID (sorted).

    Raises:
        DatasetError: ``DATASET_DUPLICATE_ID`` when two files have one case ID.
    """
    folder = Path(folder)
    return unique_ids(image_entries(folder), f"folder {folder.name}")


def read_channels(paths: list[Path] | tuple[Path, ...] | list[str], **dicom_options: Any) -> Volume:
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
                "CHANNELS_GRID_MISMATCH", f"{Path(str(path)).name} does not share the grid of {Path(str(paths[0])).name}",
                "all channels of a case must have the same shape, spacing, origin and direction",
            )
    if len(volumes) == 1:
        return first
    return Volume(np.concatenate([v.array for v in volumes]), first.affine, first.meta)
