"""DICOM header pass: which files are images, their geometry facts, and how they group into series.

Headers are read with ``defer_size`` (pixel data is located, not read). Files without the DICOM preamble are
skipped (no ``force=True`` guessing), non-image objects are skipped and listed by SOP class, and image files
are grouped by SeriesInstanceUID, then orientation plane and matrix size. No patient tag is read into the
records kept here.
"""

from __future__ import annotations

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError, describe, require_exists
from medseg.threads import io_threads

NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")

# SOP classes that carry no image to segment (skipped and listed by name).
NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66",  # segmentation, spatial registration, fiducials, ...
    "1.2.840.10008.5.1.4.1.1.481",  # RT dose/structure set/plan/treatment records
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.9",  # waveforms
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated PDF/CDA
    "1.2.840.10008.5.1.4.1.1.67",  # real-world value mapping
)


def file_label(path: Path) -> str:
    """How messages and case IDs name a DICOM file without its name: PACS exports often name files and folders
    after the patient, so a file is ``file <first 8 hex digits of SHA-256 of its absolute path>``
    (``python -c "import hashlib,os,sys; print(hashlib.sha256(os.path.abspath(sys.argv[1]).encode()).hexdigest()[:8])" F``
    finds it again)."""
    return f"file {hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:8]}"


def scrub(text: str, path: Path) -> str:
    """``text`` (a library's error message) with the file's path and name replaced by its label."""
    label = file_label(path)
    for part in (os.path.abspath(path), str(path), Path(path).name):
        text = text.replace(part, label)
    return text


@dataclass
class DicomFile:
    """Header facts of one DICOM image file (no patient identifiers)."""

    path: Path
    series_uid: str
    sop_class: str
    transfer_syntax: str
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    frames: int
    orientation: np.ndarray | None  # (6,) row cosine, column cosine
    position: np.ndarray | None  # (3,) LPS mm
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns)
    slope: float
    intercept: float
    instance_number: int | None
    modality: str
    pixel_offset: int | None  # byte offset of native pixel data, when known
    pixel_length: int | None
    study_uid: str = ""
    frame_of_reference: str = ""
    sop_instance: str = ""  # what RTSTRUCT contours and DICOM-SEG frames reference

    @property
    def label(self) -> str:
        """How messages name this file: its instance number and series hash, never its name or folder."""
        if self.instance_number is None:
            return file_label(self.path)
        return f"instance {self.instance_number} of series {hashlib.sha256(self.series_uid.encode()).hexdigest()[:10]}"

    @property
    def expected_bytes(self) -> int:
        """Bytes of uncompressed pixel data this header announces."""
        return self.rows * self.columns * self.samples * self.frames * (self.bits_allocated // 8)


@dataclass
class Skipped:
    """A file the scan left out, with a stable code and a reason."""

    path: Path
    code: str
    reason: str
    series_uid: str | None = None  # images left out (DICOM_NO_GEOMETRY): the series they belong to


def uid_hash(uid: str, n: int = 10) -> str:
    """Short, non-identifying name of a UID: the first ``n`` hex digits of its SHA-256."""
    return hashlib.sha256(uid.encode()).hexdigest()[:n]


@dataclass
class DicomSeries:
    """Slices sharing a SeriesInstanceUID, orientation and matrix size."""

    index: int
    uid: str
    files: list[DicomFile]

    @property
    def uid_hash(self) -> str:
        """Short, non-identifying name of the series (first 10 hex digits of SHA-256 of its UID)."""
        return uid_hash(self.uid)

    @property
    def name(self) -> str:
        """Safe output stem: ``series_<index>_<uid hash>`` (never built from patient tags)."""
        return f"series_{self.index:03d}_{self.uid_hash}"


@dataclass
class DicomScan:
    """Result of :func:`scan_dicom`: image series and skipped files."""

    root: Path
    series: list[DicomSeries] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def skipped_summary(self) -> dict[str, int]:
        """Counts of skipped files by reason code and SOP class (e.g. ``DICOM_NOT_IMAGE: RT Structure Set``)."""
        counts: dict[str, int] = {}
        for s in self.skipped:
            key = s.code if s.code != "DICOM_NOT_IMAGE" else f"{s.code}: {s.reason}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def skipped_text(self) -> str:
        """The skipped counts as one phrase, e.g. ``DICOM_NOT_DICOM x2, DICOM_NOT_IMAGE: RT Plan Storage x1``."""
        return ", ".join(f"{k} x{v}" for k, v in self.skipped_summary().items()) or "no files"


def is_dicom_file(path: Path) -> bool:
    """True when the file has the DICOM preamble (``DICM`` at byte 128). No guessing (no ``force=True``); a pipe or
    device is never opened."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _sop_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else f"SOP class {uid}"


def floats(value: Any, n: int) -> np.ndarray | None:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.isfinite(arr).all() else None


def _frame_geometry(ds: Any) -> tuple[np.ndarray | None, np.ndarray | None, tuple[float, float] | None]:
    """Orientation, position and pixel spacing of a single-frame image."""
    orientation = floats(ds.get("ImageOrientationPatient"), 6) if "ImageOrientationPatient" in ds else None
    position = floats(ds.get("ImagePositionPatient"), 3) if "ImagePositionPatient" in ds else None
    spacing = floats(ds.get("PixelSpacing"), 2) if "PixelSpacing" in ds else None
    return orientation, position, (float(spacing[0]), float(spacing[1])) if spacing is not None else None


def read_header(path: Path) -> DicomFile:
    """Reads one file's header (pixel data located, not read).

    Raises:
        InputError: ``DICOM_NOT_DICOM``, ``DICOM_UNREADABLE``, ``DICOM_NO_TRANSFER_SYNTAX``, ``DICOM_NOT_IMAGE``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe or device would block or never end
            raise InputError("INPUT_UNREADABLE", f"{file_label(path)} is not a regular file (a pipe, socket or device)")
        with open(path, "rb") as fh:
            fh.seek(128)
            preamble = fh.read(4)
    except OSError as exc:
        raise InputError("INPUT_UNREADABLE", f"{file_label(path)} cannot be opened: {describe(exc, path)}",
                         "a broken symbolic link, a link loop or a permission problem?") from None
    if preamble != b"DICM":
        raise InputError("DICOM_NOT_DICOM", f"{file_label(path)} has no DICOM preamble ('DICM' at byte 128)")
    try:
        ds = pydicom.dcmread(path, defer_size=1024)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise InputError("DICOM_UNREADABLE", f"cannot parse the header of {file_label(path)}: {scrub(describe(exc, path), path)}") from None
    try:
        return _dicom_file(path, ds)
    except (ValueError, TypeError, AttributeError, KeyError, OverflowError) as exc:
        raise InputError("DICOM_UNREADABLE", f"{file_label(path)}: a malformed header value: {scrub(describe(exc, path), path)}",
                         "re-export the file from the PACS/modality") from None


def number(value: Any, default: float) -> float:
    """A DICOM decimal (RescaleSlope, RescaleIntercept) as a float: ``default`` when absent or empty, NaN when
    unparsable (refused when the series is loaded, as are a slope of 0 and non-finite values: :func:`check_rescale`)."""
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def check_rescale(f: DicomFile) -> None:
    """Refuses a slice whose stored values cannot be turned into real ones.

    Raises:
        InputError: ``DICOM_RESCALE_INVALID``.
    """
    if not (np.isfinite(f.slope) and f.slope != 0 and np.isfinite(f.intercept)):
        raise InputError("DICOM_RESCALE_INVALID", f"{f.label}: RescaleSlope {f.slope:g} / RescaleIntercept "
                         f"{f.intercept:g} (a slope must be a finite non-zero number, an intercept finite)",
                         "the header is damaged; re-export the series")


def _dicom_file(path: Path, ds: Any) -> DicomFile:
    """The header facts of a parsed dataset (see :func:`read_header`)."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not ts:
        raise InputError(
            "DICOM_NO_TRANSFER_SYNTAX", f"{file_label(path)} has no TransferSyntaxUID in its file meta information",
            "re-export the file from the PACS/modality",
        )
    sop = str(ds.get("SOPClassUID", ""))
    if not sop or sop.startswith(NON_IMAGE_SOP_PREFIXES) or "PixelData" not in ds or "Rows" not in ds:
        raise InputError("DICOM_NOT_IMAGE", _sop_name(sop) if sop else "no SOP class (not an image object)")
    pixel = ds.get_item(0x7FE00010, keep_deferred=True)
    offset = length = None
    if str(ts) in NATIVE_LITTLE_ENDIAN and getattr(pixel, "value_tell", None) is not None:
        offset, length = int(pixel.value_tell), int(pixel.length)
    orientation, position, spacing = _frame_geometry(ds)
    try:
        instance = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") not in (None, "") else None
    except (TypeError, ValueError):
        instance = None
    bits = int(ds.get("BitsAllocated", 16))
    return DicomFile(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_class=sop,
        transfer_syntax=str(ts),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        samples=int(ds.get("SamplesPerPixel", 1)),
        bits_allocated=bits,
        bits_stored=int(ds.get("BitsStored", bits) or bits),
        signed=int(ds.get("PixelRepresentation", 0)) == 1,
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        orientation=orientation,
        position=position,
        pixel_spacing=spacing,
        slope=number(ds.get("RescaleSlope"), 1.0),
        intercept=number(ds.get("RescaleIntercept"), 0.0),
        instance_number=instance,
        modality=str(ds.get("Modality", "")),
        pixel_offset=offset,
        pixel_length=length,
        study_uid=str(ds.get("StudyInstanceUID", "")),
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "")),
        sop_instance=str(ds.get("SOPInstanceUID", "")),
    )


def walk_files(root: Path) -> list[Path]:
    """Every file below ``root``, in sorted order (folders and names sorted)."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files.extend(Path(dirpath) / f for f in sorted(filenames))
    return files


def _orientation_key(f: DicomFile) -> tuple:
    # coarse key: different planes (axial/coronal localizers) separate; small wobble stays together and is
    # refused by validation (DICOM_ORIENTATION_INCONSISTENT)
    return tuple(np.round(f.orientation, 1)) if f.orientation is not None else ()


def scan_dicom(root: str | Path, workers: int | None = None) -> DicomScan:
    """Scans a folder (recursively) or a single file for DICOM image series.

    Args:
        root: Folder or file.
        workers: Threads for the header pass (default: :func:`medseg.threads.io_threads`, this process's CPU share).

    Returns:
        :class:`DicomScan`; series are numbered in order of their first file path.

    Raises:
        InputError: ``PATH_NOT_FOUND``.
    """
    root = Path(root)
    require_exists(root, "DICOM input")
    return scan_paths(root, [root] if root.is_file() else walk_files(root), workers)


def scan_paths(root: Path, paths: list[Path], workers: int | None = None) -> DicomScan:
    """Like :func:`scan_dicom` over the given files (``root`` is recorded for messages)."""
    scan = DicomScan(Path(root))

    def header(path: Path) -> DicomFile | Skipped:
        try:
            return read_header(path)
        except InputError as exc:
            return Skipped(path, exc.code, exc.message)

    with ThreadPoolExecutor(max_workers=io_threads(workers)) as pool:
        headers = list(pool.map(header, paths))
    groups: dict[tuple, list[DicomFile]] = {}
    for item in headers:
        if isinstance(item, Skipped):
            scan.skipped.append(item)
        elif item.frames == 1 and (item.position is None or item.orientation is None):
            scan.skipped.append(Skipped(item.path, "DICOM_NO_GEOMETRY",
                                        "single-frame image without ImagePositionPatient/Orientation", item.series_uid))
        else:
            key: tuple = (item.series_uid, _orientation_key(item), item.rows, item.columns, item.samples, item.frames > 1)
            if item.frames > 1:
                key = key + (str(item.path),)  # each multi-frame object is its own volume
            groups.setdefault(key, []).append(item)
    for index, files in enumerate(groups.values()):
        scan.series.append(DicomSeries(index, files[0].series_uid, files))
    return scan
