"""Which series of a study are segmented (``inference.series_selection``): modality, a description regex, a
minimum number of image instances and the slice orientation. Every series gets a verdict with its reason, so the
manifest says why a series was left out. Works on DICOM JSON metadata (DICOMweb) and on scanned series (listener).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from medseg.config import SeriesSelectionConfig

AXES = ("sagittal", "coronal", "axial")  # main axis of the slice normal: x (L-R), y (A-P), z (S-I)


@dataclass
class SeriesInfo:
    """What selection looks at, from the series' instance headers."""

    uid: str
    modality: str
    description: str
    n_images: int  # instances with pixel data geometry (Rows and ImageOrientationPatient)
    n_instances: int
    orientation: str | None  # sagittal | coronal | axial | None (no image geometry)
    bytes_estimate: int  # decoded pixel bytes of all images

    @property
    def uid_hash(self) -> str:
        from medseg.io.dicom_headers import uid_hash

        return uid_hash(self.uid)


def orientation_of(cosines) -> str | None:
    """The anatomical plane of a slice from its ImageOrientationPatient (main axis of the normal)."""
    try:
        values = np.asarray([float(v) for v in cosines], dtype=float)
    except (TypeError, ValueError):
        return None
    if values.shape != (6,):
        return None
    normal = np.cross(values[:3], values[3:])
    return AXES[int(np.argmax(np.abs(normal)))] if np.linalg.norm(normal) > 0.5 else None


def _json_value(item: dict, tag: str):
    values = item.get(tag, {}).get("Value")
    return values if values else None


def info_from_json(uid: str, instances: list[dict]) -> SeriesInfo:
    """A :class:`SeriesInfo` from DICOM JSON instance metadata (WADO-RS ``/metadata``)."""
    modality = description = ""
    n_images, orientation, total = 0, None, 0
    for item in instances:
        modality = modality or str((_json_value(item, "00080060") or [""])[0])
        description = description or str((_json_value(item, "0008103E") or [""])[0])
        rows, columns = _json_value(item, "00280010"), _json_value(item, "00280011")
        cosines = _json_value(item, "00200037")
        if rows and columns and cosines:
            n_images += 1
            orientation = orientation or orientation_of(cosines)
            bits = int((_json_value(item, "00280100") or [16])[0])
            samples = int((_json_value(item, "00280002") or [1])[0])
            frames = int(str((_json_value(item, "00280008") or [1])[0]) or 1)
            total += int(rows[0]) * int(columns[0]) * max(bits // 8, 1) * samples * frames
    return SeriesInfo(uid, modality, description, n_images, len(instances), orientation, total)


def info_from_series(series, description: str) -> SeriesInfo:
    """A :class:`SeriesInfo` from a scanned :class:`medseg.io.dicom_headers.DicomSeries` (the listener's received
    series) and its SeriesDescription, which the scan does not keep."""
    files = series.files
    total = sum(f.rows * f.columns * max(f.bits_allocated // 8, 1) * f.samples * f.frames for f in files)
    orientation = orientation_of(files[0].orientation) if files and files[0].orientation is not None else None
    return SeriesInfo(series.uid, files[0].modality if files else "", description, len(files), len(files),
                      orientation, total)


def verdict(info: SeriesInfo, rules: SeriesSelectionConfig, max_bytes: float | None = None) -> tuple[str | None, str]:
    """``(None, "selected")`` or ``(code, reason)`` for a series left out: ``SERIES_NOT_SELECTED`` (with the rule
    that failed) or ``SERIES_TOO_LARGE``. The reason never repeats the description (it may name a patient)."""
    if rules.modalities and info.modality.upper() not in {m.upper() for m in rules.modalities}:
        return "SERIES_NOT_SELECTED", f"modality {info.modality or 'none'} is not one of {', '.join(rules.modalities)}"
    if rules.description_regex and not re.search(rules.description_regex, info.description, re.IGNORECASE):
        return "SERIES_NOT_SELECTED", "SeriesDescription does not match inference.series_selection.description_regex"
    if info.n_images < rules.min_slices:
        return "SERIES_NOT_SELECTED", f"{info.n_images} image instance(s), fewer than min_slices {rules.min_slices}"
    if rules.orientation != "any" and info.orientation != rules.orientation:
        return "SERIES_NOT_SELECTED", f"{info.orientation or 'unknown'} slices, not {rules.orientation}"
    if max_bytes is not None and info.bytes_estimate > max_bytes:
        return "SERIES_TOO_LARGE", (f"{info.bytes_estimate / 2**20:.0f} MB of pixels, more than pacs.max_series_mb "
                                    f"{max_bytes / 2**20:.0f}")
    return None, "selected"
