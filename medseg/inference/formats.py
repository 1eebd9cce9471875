"""The output-format catalogue: what ``--output-type`` can name, each format declared once.

Every format says its file ending, whether it is written from a DICOM source series' headers (and so needs a DICOM
input), whether the result is a DICOM object (sent on by ``--push`` and the listener) and its writer. The CLI help,
:func:`parse_output_type`, the output paths of a case and the writing all derive from :data:`OUTPUT_FORMATS`; a
format is chosen once, by name, never again by file suffix. A new format is its writer (one module) and one
:func:`register_format` call here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.errors import InputError
from medseg.registry import Registry

if TYPE_CHECKING:  # light at import: the CLI builds its help from this catalogue
    from medseg.io.dicom_derived import Producer
    from medseg.io.volume import Volume

#: ``writer(labels, target, source volume, label names, producer)``
Writer = Callable[["Volume", Path, "Volume", "dict[int, str]", "Producer"], object]


@dataclass(frozen=True)
class OutputFormat:
    """One ``--output-type`` value.

    Attributes:
        name: The value (``nifti``, ``dicom-seg`` ...).
        suffix: The file ending of ``<case><suffix>``.
        dicom_input: Written from the DICOM source series' headers: only for DICOM inputs (others get NIfTI, with
            a note).
        dicom_object: The result is a DICOM object (``--push`` and the listener send it on).
        write: The writer.
        title: How messages name it (``DICOM-SEG``).
        description: For the documentation.
    """

    name: str
    suffix: str
    dicom_input: bool
    dicom_object: bool
    write: Writer
    title: str
    description: str


OUTPUT_FORMATS: Registry[OutputFormat] = Registry("output format", "--output-type")


def register_format(fmt: OutputFormat) -> OutputFormat:
    """Adds a format to the catalogue."""
    return OUTPUT_FORMATS.add(fmt.name, fmt)


def _label_dtype(labels: Volume) -> type:
    import numpy as np

    return np.uint8 if labels.array.dtype == np.uint8 else np.uint16


def _nifti(labels: Volume, target: Path, source: Volume, names: dict[int, str], producer: Producer) -> None:
    from medseg.io.nifti import write_nifti

    write_nifti(labels, target, _label_dtype(labels))


def _nrrd(labels: Volume, target: Path, source: Volume, names: dict[int, str], producer: Producer) -> None:
    from medseg.io.sitk_formats import write_sitk

    write_sitk(labels, target, _label_dtype(labels))


def _png(labels: Volume, target: Path, source: Volume, names: dict[int, str], producer: Producer) -> None:
    import numpy as np
    from PIL import Image

    from medseg.fsutil import atomic_write

    image = Image.fromarray(np.ascontiguousarray(labels.array[0], dtype=np.uint8))
    atomic_write(target, lambda tmp: image.save(tmp, format="PNG"))


def _dicom_seg(labels: Volume, target: Path, source: Volume, names: dict[int, str], producer: Producer) -> None:
    from medseg.io.dicom_seg import write_dicom_seg

    write_dicom_seg(labels, source, target, names, producer)


def _rtstruct(labels: Volume, target: Path, source: Volume, names: dict[int, str], producer: Producer) -> None:
    from medseg.io.rtstruct import write_rtstruct

    write_rtstruct(labels, source, target, names, producer)


for _fmt in (
    OutputFormat("nifti", ".nii.gz", False, False, _nifti, "NIfTI", "NIfTI label map (uint8) on the input's grid"),
    OutputFormat("nrrd", ".nrrd", False, False, _nrrd, "NRRD", "NRRD label map (compressed) on the input's grid (3D Slicer)"),
    OutputFormat("dicom-seg", ".dcm", True, True, _dicom_seg, "DICOM-SEG", "DICOM Segmentation referencing the source series"),
    OutputFormat("rtstruct", ".rtstruct.dcm", True, True, _rtstruct, "RTSTRUCT", "RT Structure Set, one ROI per label"),
):
    register_format(_fmt)
#: 2D pictures (PNG, JPEG, TIFF, BMP) get their label map as a PNG mask in place of NIfTI or NRRD.
PICTURE = OutputFormat("png", ".png", False, False, _png, "PNG", "PNG mask of a 2D picture")


def help_text() -> str:
    """The ``--output-type`` help: the formats, and how DICOM formats combine."""
    names = ", ".join(OUTPUT_FORMATS)
    dicom = ",".join(f.name for f in OUTPUT_FORMATS.values() if f.dicom_input)
    return f"{names}; DICOM formats combine for DICOM inputs (e.g. {dicom}); 2D pictures get PNG masks."


def parse_output_type(text: str) -> tuple[OutputFormat, ...]:
    """``"dicom-seg,rtstruct"`` -> the two formats. Formats written from DICOM headers may be combined; the others
    stand alone.

    Examples:
        >>> [f.suffix for f in parse_output_type("dicom-seg,rtstruct")]
        ['.dcm', '.rtstruct.dcm']

    Raises:
        InputError: ``OUTPUT_TYPE_INVALID`` for an unknown or empty format, or a combination that is not allowed.
    """
    names = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in OUTPUT_FORMATS]
    formats = tuple(f for f in OUTPUT_FORMATS.values() if f.name in names)  # catalogue order: the first is "labels"
    if not names or unknown or (len(formats) > 1 and not all(f.dicom_input for f in formats)):
        raise InputError("OUTPUT_TYPE_INVALID", f"unknown output type {text!r}", f"use {help_text()}")
    return formats


def label_paths(out_dir: Path, case_id: str, source: Path, dicom: bool, output_type: str) -> dict[str, tuple[Path, OutputFormat]]:
    """Where a case's label maps go and in which format, by kind: ``labels`` first (the first format asked for),
    then one entry per further format (its name). A DICOM-only format for a non-DICOM input becomes NIfTI; a 2D
    picture's label map is a PNG mask."""
    from medseg.io.image2d import is_image2d

    formats = [f for f in parse_output_type(output_type) if dicom or not f.dicom_input] or [OUTPUT_FORMATS["nifti"]]
    if not dicom and isinstance(source, Path) and is_image2d(source):
        formats = [PICTURE]
    return {("labels" if i == 0 else f.name): (out_dir / f"{case_id}{f.suffix}", f) for i, f in enumerate(formats)}


def is_dicom_object(name: str) -> bool:
    """True for an output file whose format is a DICOM object (what ``--push`` and the listener send)."""
    return any(name.endswith(f.suffix) for f in OUTPUT_FORMATS.values() if f.dicom_object)
