"""DICOM reading: scan a folder, group slices into series, validate the stack, assemble a :class:`Volume`.

Reading is two passes. The scan reads headers only (``defer_size``: pixel data is located, not read) of
every file under a folder, skips what is not DICOM or not an image (listed by SOP class), and groups image
slices by SeriesInstanceUID, then by orientation and matrix size. Loading a series sorts slices along the
slice normal, validates the stack (orientation, duplicates, gaps, gantry tilt, size caps) before any pixel
buffer is allocated, then reads pixels: native little-endian data straight from the file offset, everything
else through pydicom's decoders (pylibjpeg plugins for JPEG/JPEG-LS/JPEG 2000, built-in RLE/deflate).

Geometry: slice spacing comes from ImagePositionPatient only (never SpacingBetweenSlices or SliceThickness).
Array axes are ``X`` = DICOM column index, ``Y`` = row index, ``Z`` = sorted slice index, the affine maps them
to RAS+ millimetres (DICOM's LPS with the first two axes negated), the same convention as dcm2niix and ITK.

Patient identifiers are never read into :class:`Volume` metadata, messages or logs: series are named by index
and a hash of their UID.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.io.dicom_geometry import LPS_TO_RAS, DicomTolerances, stack_geometry, untilt
from medseg.io.dicom_headers import DicomFile, DicomScan, DicomSeries, check_rescale, floats, number, read_header, scan_dicom
from medseg.io.dicom_pixels import check_decodable, native_dtype, read_frame_into, read_pixels, rescale_dtype
from medseg.io.volume import MAX_VOLUME_BYTES, Volume
from medseg.threads import io_threads

__all__ = ["DicomScan", "DicomSeries", "LPS_TO_RAS", "load_series", "read_dicom", "read_dicom_image", "scan_dicom"]

log = logging.getLogger(__name__)


def load_series(
    series: DicomSeries,
    *,
    tolerances: DicomTolerances | None = None,
    allow_tilt: bool = False,
    max_bytes: int = MAX_VOLUME_BYTES,
    workers: int | None = None,
) -> Volume:
    """Validates and loads one scanned series (or one multi-frame object) as a :class:`Volume` ``(C, X, Y, Z)``.

    Rescale slope/intercept are applied per slice; the result is int16/int32 when that is exact, else float32.

    Raises:
        InputError: the codes of :func:`stack_geometry` and :func:`read_pixels`, ``DICOM_NO_GEOMETRY``,
            ``DICOM_TOO_LARGE``.
    """
    what = f"series {series.index} ({series.uid_hash})"
    if len(series.files) == 1 and series.files[0].frames > 1:
        return _load_multiframe(series, what, tolerances, allow_tilt, max_bytes)
    files = series.files
    first = files[0]
    if first.pixel_spacing is None:
        raise InputError("DICOM_NO_GEOMETRY", f"{what}: PixelSpacing is missing", "never assumed to be 1 mm")
    geometry = stack_geometry(
        np.stack([f.position for f in files]), np.stack([f.orientation for f in files]), first.pixel_spacing,  # type: ignore[misc]  # scan_dicom set aside files without geometry
        what=what, tolerances=tolerances, allow_tilt=allow_tilt, instance_numbers=[f.instance_number for f in files],
    )
    n = len(files)
    nbytes = first.rows * first.columns * first.samples * n * 4
    if nbytes > max_bytes:
        raise InputError("DICOM_TOO_LARGE", f"{what}: {nbytes / 1e9:.1f} GB exceeds the cap of {max_bytes / 1e9:.1f} GB")
    for f in files:
        check_decodable(f)  # preflight: refuse before reading any pixels
        check_rescale(f)
    ordered = [files[i] for i in geometry.order]
    array, slopes, intercepts = _read_stack(ordered, workers)
    return _finish(array, geometry, _meta(series, first, n, slopes, intercepts), ordered, what)


def _finish(array: np.ndarray, geometry, meta: dict, files: list[DicomFile], what: str) -> Volume:
    """Undoes gantry tilt when it was allowed (recorded in ``meta``) and builds the volume."""
    if geometry.shift_per_slice is not None:
        array = untilt(array, geometry.shift_per_slice)
        meta.update(gantry_tilt_degrees=round(geometry.tilt_degrees, 3), resampled="gantry tilt corrected (linear)")
        log.warning("%s: gantry tilt %.2f degrees corrected by resampling", what, geometry.tilt_degrees)
    meta["slice_geometry"] = geometry.record()
    meta["dicom_files"] = [str(f.path) for f in files]
    return Volume(array, geometry.affine, meta)


def _read_stack(ordered: list[DicomFile], workers: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stored values of sorted slices into one slice-major buffer, rescaled in place where exact.

    Returns ``(array (C, X, Y, Z) view of the buffer, slopes, intercepts)``. Memory: one buffer of the stored
    dtype (plus one of the output dtype when rescaling needs int32/float32).
    """
    first = ordered[0]
    n = len(ordered)
    dtypes = {native_dtype(f) for f in ordered}
    sample = () if first.samples == 1 else (first.samples,)
    if len(dtypes) == 1 and None not in dtypes:
        buffer = np.empty((n, first.rows, first.columns, *sample), dtype=dtypes.pop())
    else:  # compressed or mixed: decode the first slice to learn the dtype
        probe = read_pixels(first)[0]
        buffer = np.empty((n, first.rows, first.columns, *sample), dtype=probe.dtype)

    def fill(k: int) -> None:
        f = ordered[k]
        if (f.rows, f.columns, f.samples) != (first.rows, first.columns, first.samples):
            raise InputError("DICOM_PIXELS_CORRUPT", f"{f.label}: matrix size differs from the series")
        read_frame_into(f, buffer[k])

    with ThreadPoolExecutor(max_workers=io_threads(workers)) as pool:
        list(pool.map(fill, range(n)))
    slopes = np.array([f.slope for f in ordered])
    intercepts = np.array([f.intercept for f in ordered])
    integral = buffer.dtype.kind in "iu"
    dtype = rescale_dtype(slopes, intercepts, float(buffer.min()), float(buffer.max())) if integral else np.dtype(np.float32)
    if dtype == buffer.dtype:
        out = buffer
        for k in np.flatnonzero(intercepts):
            out[k] += dtype.type(intercepts[k])
    else:
        out = np.empty(buffer.shape, dtype=dtype)
        for i in range(n):
            np.multiply(buffer[i], slopes[i], out=out[i], casting="unsafe")
            out[i] += dtype.type(intercepts[i])
    # (Z, rows, columns[, samples]) -> (C, X=column, Y=row, Z): a view, no copy
    array = out[..., None] if not sample else out
    return array.transpose(3, 2, 1, 0), slopes, intercepts


def _meta(series: DicomSeries, first: DicomFile, n: int, slopes: np.ndarray, intercepts: np.ndarray) -> dict:
    from pydicom.uid import UID

    return {
        "source_format": "dicom",
        "series_index": series.index,
        "series_uid_hash": series.uid_hash,
        "series_instance_uid": series.uid,  # for DICOM-SEG references and provenance; not a patient identifier
        "modality": first.modality,
        "sop_class": UID(first.sop_class).name,
        "transfer_syntax": UID(first.transfer_syntax).name,
        "n_slices": n,
        "rescale_varies": bool(np.ptp(slopes) > 0 or np.ptp(intercepts) > 0),
    }


def _load_multiframe(
    series: DicomSeries, what: str, tolerances: DicomTolerances | None, allow_tilt: bool, max_bytes: int
) -> Volume:
    """An enhanced/multi-frame object: per-frame positions from the functional groups, or refused."""
    import pydicom

    f = series.files[0]
    ds = pydicom.dcmread(f.path, stop_before_pixels=True)
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != f.frames:
        raise InputError(
            "DICOM_NO_GEOMETRY", f"{what}: multi-frame object without per-frame positions ({f.frames} frames)",
            "slice positions are never assumed",
        )

    def item(group: Any, seq: str, attr: str) -> Any:
        for source in (group, shared):
            if source is not None and seq in source and attr in source[seq].value[0]:
                return source[seq].value[0].get(attr)
        return None

    positions, orientations, slopes, intercepts = [], [], [], []
    spacing = None
    for group in per_frame:
        pos = floats(item(group, "PlanePositionSequence", "ImagePositionPatient"), 3)
        ori = floats(item(group, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        ps = floats(item(group, "PixelMeasuresSequence", "PixelSpacing"), 2)
        if pos is None or ori is None or ps is None:
            raise InputError("DICOM_NO_GEOMETRY", f"{what}: a frame lacks its position, orientation or spacing")
        positions.append(pos)
        orientations.append(ori)
        spacing = spacing or (float(ps[0]), float(ps[1]))
        slope = item(group, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = item(group, "PixelValueTransformationSequence", "RescaleIntercept")
        slopes.append(number(slope, f.slope))
        intercepts.append(number(intercept, f.intercept))
        check_rescale(DicomFile(**{**vars(f), "slope": slopes[-1], "intercept": intercepts[-1]}))
    assert spacing is not None
    geometry = stack_geometry(
        np.stack(positions), np.stack(orientations), spacing, what=what, tolerances=tolerances,
        allow_tilt=allow_tilt,
    )
    if f.expected_bytes * 2 > max_bytes:
        raise InputError("DICOM_TOO_LARGE", f"{what}: {f.expected_bytes / 1e9:.1f} GB exceeds the cap")
    raw = read_pixels(f)  # (frames, rows, columns[, samples])
    raw = raw[geometry.order]
    s, i = np.array(slopes)[geometry.order], np.array(intercepts)[geometry.order]
    dtype = rescale_dtype(s, i, float(raw.min()), float(raw.max())) if raw.dtype.kind in "iu" else np.dtype(np.float32)
    if raw.ndim == 3:
        raw = raw[..., None]
    array = np.moveaxis(raw, (3, 2, 1, 0), (0, 1, 2, 3))  # (C, X=col, Y=row, Z)
    scaled = array.astype(np.float32) * s.astype(np.float32) + i.astype(np.float32)
    array = scaled if dtype.kind == "f" else scaled.round().astype(dtype)
    return _finish(np.ascontiguousarray(array), geometry, _meta(series, f, f.frames, s, i), [f], what)


def read_dicom_image(path: str | Path) -> Volume:
    """Reads one single-frame DICOM image as a 2D :class:`Volume` ``(C, X, Y)``.

    The affine comes from the plane geometry when present; images without it (secondary captures,
    ultrasound) get the identity, like other photos, recorded as ``meta["geometry"] = "none"``.

    Raises:
        InputError: the codes of :func:`read_header` and :func:`read_pixels`; ``DICOM_NO_GEOMETRY`` for
            multi-frame objects without per-frame positions.
    """
    return _image(read_header(Path(path)))


def _image(f: DicomFile) -> Volume:
    if f.frames > 1:
        return load_series(DicomSeries(0, f.series_uid, [f]))
    check_rescale(f)
    raw = read_pixels(f)[0]
    plane = raw[None] if raw.ndim == 2 else np.moveaxis(raw, -1, 0)
    plane = plane.transpose(0, 2, 1)  # (C, X=col, Y=row)
    if f.slope != 1.0 or f.intercept != 0.0:
        slope, intercept = np.array([f.slope]), np.array([f.intercept])
        integral = plane.dtype.kind in "iu"
        dtype = rescale_dtype(slope, intercept, float(plane.min()), float(plane.max())) if integral else np.float32
        plane = (plane.astype(np.float32) * np.float32(f.slope) + np.float32(f.intercept)).astype(dtype)
    affine = np.eye(4)
    geometry = "none"
    if f.orientation is not None and f.position is not None and f.pixel_spacing is not None:
        row, col = f.orientation[:3], f.orientation[3:]
        lps = np.eye(4)
        lps[:3, 0], lps[:3, 1] = row * f.pixel_spacing[1], col * f.pixel_spacing[0]
        lps[:3, 2], lps[:3, 3] = np.cross(row, col), f.position
        affine, geometry = LPS_TO_RAS @ lps, "plane"
    meta = {"source_format": "dicom", "geometry": geometry, "modality": f.modality, "dicom_files": [str(f.path)]}
    return Volume(np.ascontiguousarray(plane), affine, meta)


def read_dicom(path: str | Path, **options: Any) -> Volume:
    """Reads a DICOM folder holding exactly one image series, or one DICOM file.

    Args:
        path: Folder (scanned recursively) or file.
        **options: Passed to :func:`load_series` (``allow_tilt``, ``tolerances``, ...).

    Raises:
        InputError: ``DICOM_NO_SERIES`` (listing what was skipped), ``DICOM_MULTIPLE_SERIES``, and the codes
            of :func:`load_series`.
    """
    path = Path(path)
    if path.is_file():
        f = read_header(path)
        return _image(f) if f.frames == 1 else load_series(DicomSeries(0, f.series_uid, [f]), **options)
    scan = scan_dicom(path)
    if not scan.series:
        summary = scan.skipped_text()
        broken = [s for s in scan.skipped if s.code not in ("DICOM_NOT_DICOM", "DICOM_NOT_IMAGE")]
        if broken:  # files that look like images but cannot be used: say why
            raise InputError(broken[0].code, f"no usable image series in the DICOM folder: {broken[0].reason}",
                             f"skipped: {summary}")
        raise InputError("DICOM_NO_SERIES", f"no DICOM image series in the DICOM folder (skipped: {summary})")
    if len(scan.series) > 1:
        raise InputError(
            "DICOM_MULTIPLE_SERIES", f"the DICOM folder holds {len(scan.series)} image series",
            "use `medseg convert` to split it (one output per series) or point at one series' folder",
        )
    return load_series(scan.series[0], **options)
