"""``medseg convert``: a DICOM folder (every series in it) or any supported file to NIfTI / NRRD / MetaImage.

A folder with several series writes one file per series, named ``series_<index>_<UID hash>`` (never from
patient tags); each series is converted in isolation, so one broken series does not stop the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import InputError, MedsegError, OutputError, require_exists
from medseg.fsutil import check_output_dir, check_output_file
from medseg.io.dicom_geometry import DicomTolerances
from medseg.io.dicom_headers import is_dicom_file
from medseg.io.nifti import is_nifti, strip_nifti_suffix, write_nifti
from medseg.io.sitk_formats import is_sitk_format, write_sitk
from medseg.io.volume import Volume

log = logging.getLogger(__name__)
SKIP_CODES = ("DICOM_TOO_FEW_SLICES",)  # localizers and single images: not a failure (RELIABILITY.md 6)


@dataclass
class Converted:
    """One input series or file and what became of it."""

    name: str
    status: str  # "ok" | "skipped" (localizers: too few slices) | "failed"
    output: str | None = None
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    error_code: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    slice_geometry: dict | None = None  # measured in-plane drift and step spread of a DICOM stack


@dataclass
class ConvertReport:
    """All results of one conversion, plus the files the DICOM scan skipped (counted by reason)."""

    results: list[Converted]
    skipped: dict[str, int]

    @property
    def ok(self) -> bool:
        """True when at least one output was written and nothing failed (skipped localizers are fine)."""
        return any(r.status == "ok" for r in self.results) and all(r.status != "failed" for r in self.results)


def _write(volume: Volume, target: Path) -> Path:
    if is_sitk_format(target):
        return write_sitk(volume, target)
    return write_nifti(volume, target)


def _split(out: Path) -> tuple[Path, str, str] | None:
    """``(folder, stem, ending)`` for a file name with a volume ending; None for a folder."""
    if is_nifti(out):
        ending = ".nii.gz" if out.name.lower().endswith(".nii.gz") else ".nii"
        return out.parent, strip_nifti_suffix(out.name), ending
    if is_sitk_format(out):
        return out.parent, out.stem, out.suffix.lower()
    return None


def _safe_target(root: Path, name: str) -> Path:
    target = (root / name).resolve()
    if root.resolve() not in target.parents:
        raise OutputError("OUTPUT_PATH_UNSAFE", f"refusing to write outside {root}")
    return target


def _convert_file(path: Path, out: Path, overwrite: bool, roots: list[Path]) -> Converted:
    """One image file (NIfTI, NRRD, MetaImage, 2D) converted to ``out``; a refusal is the record's error."""
    from medseg.io.readers import read_volume

    result = Converted(path.name, "failed")
    try:
        if out.exists() and not overwrite:
            raise OutputError("OUTPUT_EXISTS", f"{out.name} exists", "pass --overwrite to replace it")
        volume = read_volume(path)
        _write(volume, out)
        result.status, result.output = "ok", str(out)
        result.shape, result.spacing = volume.spatial_shape, tuple(round(s, 4) for s in volume.spacing)
        result.notes.extend(volume.meta.get("notes", []))
    except MedsegError as exc:
        result.error_code, result.error = exc.code, exc.one_line(roots)
    return result


def _record_series(result: Converted, volume, target: Path) -> None:
    """Marks a written series ok with its shape, spacing, slice geometry and notes (a resampled tilt, slice
    positions that were uneven but within tolerance)."""
    result.status, result.output = "ok", str(target)
    result.shape, result.spacing = volume.spatial_shape, tuple(round(s, 4) for s in volume.spacing)
    if "gantry_tilt_degrees" in volume.meta:
        result.notes.append(f"gantry tilt {volume.meta['gantry_tilt_degrees']} degrees resampled")
    result.slice_geometry = volume.meta.get("slice_geometry")
    g = result.slice_geometry
    if g and "gantry_tilt_degrees" not in volume.meta and (g["inplane_drift_px"] >= 0.01 or g["step_spread_pct"] >= 0.1):
        result.notes.append(f"slice positions within tolerance: in-plane drift {g['inplane_drift_mm']} mm "
                            f"({g['inplane_drift_px']} pixel), step spread {g['step_spread_pct']} %")


def convert(inputs: str | Path, out: str | Path, *, overwrite: bool = False, allow_tilt: bool = False,
            tolerances: DicomTolerances | None = None, labels: Any = None) -> ConvertReport:
    """Converts a DICOM folder/file or any supported image file.

    A series that an RTSTRUCT or DICOM-SEG in the folder references also gets its label map,
    ``<series output>_labels<ending>``, on the series' grid, and ``<series output>_labels.json`` naming the values
    and the ROIs each came from (:mod:`medseg.io.dicom_labels`). With ``labels`` (the config's ``data.labels``) the
    ROIs are matched to those labels; without, each distinct ROI name is its own label, numbered in ROI order.

    Args:
        inputs: A DICOM folder (scanned recursively), a DICOM file, or a NIfTI/NRRD/MetaImage/2D file; an RTSTRUCT
            or SEG file converts its series (found in the file's folder, recursively) and its label map only.
        out: Output file (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``) or a folder (NIfTI files inside). With a
            file name and several series, each series gets ``<stem>_series_<i>_<hash><ending>`` beside it.
        overwrite: Replace existing outputs.
        allow_tilt: Resample gantry-tilted series instead of refusing them.
        tolerances: When a slice stack is one volume (``--dicom KEY=VALUE``).
        labels: ``data.labels`` rules for the RTSTRUCT/SEG ROIs (see above).

    Returns:
        :class:`ConvertReport`.

    Raises:
        InputError: ``PATH_NOT_FOUND``; ``DICOM_NO_SERIES`` when a DICOM folder holds no image series.
    """
    from medseg.io.dicom import load_series, scan_dicom

    inputs, out = Path(inputs), Path(out)
    require_exists(inputs, "input")
    layout = _split(out)
    roots = [inputs if inputs.is_dir() else inputs.parent]
    if layout is None:
        check_output_dir(out)
    else:
        check_output_file(out)
    if not (inputs.is_dir() or is_dicom_file(inputs)):
        if layout is None:
            raise OutputError("OUTPUT_NAME_INVALID", f"-o must name a .nii.gz, .nii, .nrrd or .mha file, not {out.name}")
        return ConvertReport([_convert_file(inputs, out, overwrite, roots)], {})

    label_file = None
    if inputs.is_file():
        from medseg.io.dicom_labels import read_label_object

        if read_label_object(inputs) is not None:  # an RTSTRUCT/SEG file: its series is found beside it
            label_file, inputs = inputs, inputs.parent
    scan = scan_dicom(inputs)
    if not scan.series:
        summary = scan.skipped_text()
        raise InputError("DICOM_NO_SERIES", f"no DICOM image series under {inputs} (skipped: {summary})")
    index = None
    if any(s.code == "DICOM_NOT_IMAGE" for s in scan.skipped):
        from medseg.io.dicom_labels import index_studies, label_rules, only_object

        rules = label_rules(labels) if labels else None
        index = index_studies(inputs, rules, scan)
        if label_file is not None:
            index = only_object(index, label_file, rules)
            scan.series = index.series
        used = {str(o.path) for o in index.objects}  # read as labels: not skipped
        scan.skipped = [s for s in scan.skipped if str(s.path) not in used]
    cases = {c.id: c for c in index.cases} if index else {}
    results = []
    for series in scan.series:
        if layout is None:
            target = _safe_target(out, f"{series.name}.nii.gz")
        else:
            folder, stem, ending = layout
            name = f"{stem}{ending}" if len(scan.series) == 1 else f"{stem}_{series.name}{ending}"
            target = _safe_target(folder, name)
        result = Converted(series.name, "failed")
        try:
            if target.exists() and not overwrite:
                raise OutputError("OUTPUT_EXISTS", f"{target.name} exists", "pass --overwrite to replace it")
            volume = load_series(series, tolerances=tolerances, allow_tilt=allow_tilt)
            _write(volume, target)
            _record_series(result, volume, target)
            if series.name in cases:
                results.append(result)
                result = Converted(f"{series.name} labels", "failed")
                _convert_labels(cases[series.name], volume, target, overwrite, result)
        except MedsegError as exc:
            if exc.code == "DISK_FULL":  # every further series would fail too; the outputs so far are complete
                raise
            result.error_code, result.error = exc.code, exc.one_line(roots)
            if exc.code in SKIP_CODES:
                result.status = "skipped"
                log.info("%s skipped: %s", series.name, exc.message)
            else:
                log.error("%s: %s", series.name, result.error)
        results.append(result)
    if index is not None:
        results.extend(Converted(what, "failed", error_code=code, error=f"{code}: {message}")
                       for what, code, message in index.problems)
    return ConvertReport(results, scan.skipped_summary())


def _convert_labels(case, volume: Volume, image_target: Path, overwrite: bool, result: Converted) -> None:
    """The label map of a series' RTSTRUCT/SEG objects beside its image output, and its names and sources."""
    from medseg.fsutil import write_json
    from medseg.io.dicom_labels import label_map

    folder, stem, ending = _split(image_target) or (image_target.parent, image_target.name, "")
    target = folder / f"{stem}_labels{ending}"
    if target.exists() and not overwrite:
        raise OutputError("OUTPUT_EXISTS", f"{target.name} exists", "pass --overwrite to replace it")
    array = label_map(case, case.rules, volume)
    _write(volume.with_array(array[None]), target)
    names = {"0": "background", **{str(r.value): r.name for r in case.rules}}
    write_json(folder / f"{stem}_labels.json", {"values": names, **case.sources()})
    result.status, result.output, result.shape = "ok", str(target), volume.spatial_shape
    result.spacing = tuple(round(s, 4) for s in volume.spacing)
    result.notes.extend(f"{label} <- {', '.join(rois)}" for label, rois in case.sources()["labels"].items())
    result.notes.extend(case.notes)
