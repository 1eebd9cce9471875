"""Labels from DICOM: RTSTRUCT contours and DICOM-SEG segments on the image series they reference.

A *DICOM-study dataset* is a folder (any nesting) of image series and the RTSTRUCT and/or SEG objects that label
them. Each label object is tied to one image series **of its own study**: an RTSTRUCT by the series of its
Referenced Frame of Reference Sequence (else by the images its contours reference, else by its frame of
reference when one series of the study has it), a SEG by its Referenced Series Sequence. Every image series that
a label object references is one case, named ``series_<index>_<UID hash>`` exactly as ``medseg predict`` names
it, never from patient tags or folder names.

Which ROIs make which label is the config's ``data.labels``: ``{label: [pattern, ...]}`` in label-value order
(1, 2, ...). A pattern is a regular expression searched in the ROI (or segment) name with case and white space
ignored (``"^gtv"`` matches ``GTV-1`` and ``gtv primary``). Several ROIs of one label are united. Where labels
overlap, the later label wins, or the higher ``priority``. When two label objects of one series both give ROIs to
a label, the newer object's (StructureSetDate/Time, else ContentDate/Time, else InstanceCreationDate/Time) are
used and the older ones are reported.

Rasterisation is exact and deterministic:

* **RTSTRUCT**: each CLOSED_PLANAR contour is placed on the slice whose plane it lies in (each slice's own
  ImagePositionPatient, ImageOrientationPatient and PixelSpacing: oblique and jittered series too; a point further
  than a quarter of the slice step from the plane, or a contour in another frame of reference, is
  ``RTSTRUCT_CONTOUR_OFF_GRID``). A pixel belongs to the ROI when its **centre** is inside by the **even-odd
  rule** over all of the ROI's contours on that slice (holes, islands in holes), or **on** a contour (within
  1/1000 pixel). The second part is for the writers that draw contours through the centres of a mask's boundary
  pixels (rt-utils, OpenCV-based tools): their structure sets read back to the mask they were given. medseg's own
  writer (:mod:`medseg.io.rtstruct`) places contours half-way between pixel centres, so no centre is on a contour
  and writer -> reader is lossless either way.
  POINT and OPEN contours, contours of fewer than 3 points and ROIs without contours are skipped and reported;
  repeated points are harmless.
* **DICOM-SEG** (read through highdicom): every frame is placed on the slice at its PlanePositionSequence (its
  source image when it has no position), with the series' orientation, matrix and pixel spacing, else
  ``SEG_FRAME_OFF_GRID``; segments may cover part of the series. FRACTIONAL segments are thresholded at one half.

Refusals, per case (``medseg validate`` lists them all): ``LABEL_ROI_MISSING`` (a required label without a
matching non-empty ROI), ``LABEL_ROI_AMBIGUOUS`` (one ROI matching two labels), ``LABEL_REFERENCE_MISSING`` (a label
object whose series is not in its study), ``RTSTRUCT_CONTOUR_OFF_GRID``, ``SEG_FRAME_OFF_GRID``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DatasetError, InputError, MedsegError, describe
from medseg.io.dicom_headers import DicomFile, DicomScan, DicomSeries, file_label, scan_paths, uid_hash, walk_files

log = logging.getLogger(__name__)

RTSTRUCT_SOP = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_SOP = "1.2.840.10008.5.1.4.1.1.66.4"
RASTER_VERSION = "1"  # part of the cache key: bump when rasterisation changes
PLANE_TOLERANCE = 0.25  # of the slice step: how far a contour point or SEG frame may lie from its slice's plane
IN_PLANE_TOLERANCE = 0.1  # of a pixel: how far a SEG frame's origin may lie from its slice's


# ---------------------------------------------------------------------------------------------------- label rules
@dataclass(frozen=True)
class LabelRule:
    """One label of ``data.labels``: its value, the compiled ROI-name patterns, whether a case must have it."""

    name: str
    value: int
    patterns: tuple[re.Pattern, ...]
    required: bool = True
    priority: int = 0

    def matches(self, roi_name: str) -> bool:
        key = roi_key(roi_name)
        return any(p.search(key) for p in self.patterns)


def roi_key(name: str) -> str:
    """How ROI names and patterns are compared: white space removed, case folded."""
    return "".join(str(name).split()).casefold()


def label_rules(spec: Mapping[str, Any]) -> list[LabelRule]:
    """The rules of a ``data.labels`` mapping (values: a pattern list, or an object with ``patterns``, ``required``,
    ``priority``); label values 1, 2, ... in declaration order.

    Raises:
        ConfigError: ``CONFIG_INVALID`` for an empty mapping, a label named ``background`` or a bad pattern.
    """
    from medseg.errors import ConfigError

    if not spec:
        raise ConfigError("CONFIG_INVALID_VALUE", "data.labels is empty", "name at least one label and its ROI patterns")
    rules = []
    for index, (name, source) in enumerate(spec.items()):
        if isinstance(source, str | list | tuple):
            source = {"patterns": [source] if isinstance(source, str) else list(source)}
        elif not isinstance(source, Mapping):
            source = {"patterns": source.patterns, "required": source.required, "priority": source.priority}
        if roi_key(name) == "background":
            raise ConfigError("CONFIG_INVALID_VALUE", "data.labels: 'background' is label 0, not a ROI label")
        try:
            patterns = tuple(re.compile(roi_key(p), re.IGNORECASE) for p in source["patterns"])
        except (re.error, KeyError, TypeError) as exc:
            raise ConfigError("CONFIG_INVALID_VALUE", f"data.labels.{name}: {describe(exc)}",
                              "patterns are regular expressions, e.g. ['^gtv', 'tumou?r']") from None
        priority = source.get("priority")
        rules.append(LabelRule(str(name), index + 1, patterns, bool(source.get("required", True)),
                               index if priority is None else int(priority)))
    return rules


def roi_rules(names: list[str]) -> list[LabelRule]:
    """One optional label per distinct ROI name (exact, case and spaces ignored): ``medseg convert`` without a config."""
    seen: dict[str, str] = {}
    for name in names:
        seen.setdefault(roi_key(name), name)
    return _exact_rules(list(enumerate(seen.values(), start=1)), required=False)


def exact_rules(names: Mapping[int, str]) -> list[LabelRule]:
    """Required rules matching each label name exactly (case and spaces ignored), keeping the label values: the
    reference ROIs carry the model's names (``evaluate --ref`` without ``data.labels``)."""
    return _exact_rules([(value, name) for value, name in sorted(names.items()) if value != 0], required=True)


def _exact_rules(labels: list[tuple[int, str]], required: bool) -> list[LabelRule]:
    return [LabelRule(name, value, (re.compile("^" + re.escape(roi_key(name)) + "$", re.IGNORECASE),), required, k)
            for k, (value, name) in enumerate(labels)]


# -------------------------------------------------------------------------------------------------- label objects
@dataclass
class Roi:
    """One ROI of an RTSTRUCT or one segment of a SEG."""

    number: int
    name: str
    parts: int = 0  # usable closed contours / frames
    skipped: dict[str, int] = field(default_factory=dict)  # POINT, OPEN_PLANAR, ... -> count
    frame_of_reference: str = ""


@dataclass
class LabelObject:
    """An RTSTRUCT or SEG file: what it references and the ROIs it holds (no patient data)."""

    path: Path
    kind: str  # RTSTRUCT | SEG
    study_uid: str
    series_uids: set[str]
    sop_refs: set[str]
    frame_of_reference: str
    when: str
    rois: list[Roi]

    @property
    def label(self) -> str:
        """How messages name it: ``RTSTRUCT file <path hash>``."""
        return f"{self.kind} {file_label(self.path)}"


def _seq(ds: Any, keyword: str) -> list:
    return list(ds.get(keyword, None) or [])


def _when(ds: Any) -> str:
    for date, time in (("StructureSetDate", "StructureSetTime"), ("ContentDate", "ContentTime"),
                       ("InstanceCreationDate", "InstanceCreationTime"), ("SeriesDate", "SeriesTime")):
        if ds.get(date):
            return f"{ds.get(date)}{str(ds.get(time, '') or '').split('.')[0]:0<6}"
    return ""


def read_label_object(path: Path) -> LabelObject | None:
    """The label object in ``path`` (None when it is neither RTSTRUCT nor SEG).

    Raises:
        InputError: ``DICOM_UNREADABLE`` when the header cannot be parsed.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure of a third-party file is this code
        raise InputError("DICOM_UNREADABLE", f"cannot parse {file_label(path)}: {type(exc).__name__}") from None
    sop = str(ds.get("SOPClassUID", ""))
    if sop == RTSTRUCT_SOP:
        return _rtstruct_object(path, ds)
    if sop == SEG_SOP:
        return _seg_object(path, ds)
    return None


def _rtstruct_object(path: Path, ds: Any) -> LabelObject:
    series_uids, sops, frames = set(), set(), set()
    for for_ref in _seq(ds, "ReferencedFrameOfReferenceSequence"):
        frames.add(str(for_ref.get("FrameOfReferenceUID", "")))
        for study in _seq(for_ref, "RTReferencedStudySequence"):
            for series in _seq(study, "RTReferencedSeriesSequence"):
                series_uids.add(str(series.get("SeriesInstanceUID", "")))
                sops |= {str(i.get("ReferencedSOPInstanceUID", "")) for i in _seq(series, "ContourImageSequence")}
    contours = {int(c.get("ReferencedROINumber", -1)): _seq(c, "ContourSequence") for c in _seq(ds, "ROIContourSequence")}
    rois = []
    for item in _seq(ds, "StructureSetROISequence"):
        roi = Roi(int(item.get("ROINumber", 0)), str(item.get("ROIName", "")),
                  frame_of_reference=str(item.get("ReferencedFrameOfReferenceUID", "")))
        for contour in contours.get(roi.number, []):
            kind = str(contour.get("ContourGeometricType", ""))
            n = int(contour.get("NumberOfContourPoints", 0) or 0) or len(contour.get("ContourData", []) or []) // 3
            if kind == "CLOSED_PLANAR" and n >= 3:
                roi.parts += 1
            else:
                reason = kind if kind != "CLOSED_PLANAR" else "fewer than 3 points"
                roi.skipped[reason] = roi.skipped.get(reason, 0) + 1
            sops |= {str(i.get("ReferencedSOPInstanceUID", "")) for i in _seq(contour, "ContourImageSequence")}
        rois.append(roi)
    frame = next(iter(frames - {""}), "")
    return LabelObject(path, "RTSTRUCT", str(ds.get("StudyInstanceUID", "")), series_uids - {""}, sops - {""}, frame,
                       _when(ds), rois)


def _seg_object(path: Path, ds: Any) -> LabelObject:
    series_uids, sops = set(), set()
    for series in _seq(ds, "ReferencedSeriesSequence"):
        series_uids.add(str(series.get("SeriesInstanceUID", "")))
        sops |= {str(i.get("ReferencedSOPInstanceUID", "")) for i in _seq(series, "ReferencedInstanceSequence")}
    counts: dict[int, int] = {}
    for shared in _seq(ds, "SharedFunctionalGroupsSequence"):  # one segment for every frame
        for ident in _seq(shared, "SegmentIdentificationSequence"):
            counts[int(ident.get("ReferencedSegmentNumber", 0))] = int(ds.get("NumberOfFrames", 1) or 1)
    for frame in _seq(ds, "PerFrameFunctionalGroupsSequence"):
        for ident in _seq(frame, "SegmentIdentificationSequence"):
            number = int(ident.get("ReferencedSegmentNumber", 0))
            counts[number] = counts.get(number, 0) + 1
        for derivation in _seq(frame, "DerivationImageSequence"):
            for source in _seq(derivation, "SourceImageSequence"):
                sops.add(str(source.get("ReferencedSOPInstanceUID", "")))
    rois = [Roi(int(s.SegmentNumber), str(s.get("SegmentLabel", "")), counts.get(int(s.SegmentNumber), 0),
                frame_of_reference=str(ds.get("FrameOfReferenceUID", "")))
            for s in _seq(ds, "SegmentSequence")]
    return LabelObject(path, "SEG", str(ds.get("StudyInstanceUID", "")), series_uids - {""}, sops - {""},
                       str(ds.get("FrameOfReferenceUID", "")), _when(ds), rois)


# ----------------------------------------------------------------------------------------------- the study index
@dataclass
class Assigned:
    """One ROI given to a label."""

    label: str
    roi: str
    kind: str
    object: str  # the label object's file label (path hash)


@dataclass
class LabelledCase:
    """An image series with the label objects that reference it, and how their ROIs map to labels."""

    id: str
    series: DicomSeries
    objects: list[LabelObject]
    assigned: list[Assigned] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (code, message)
    chosen: dict[str, list[tuple[LabelObject, Roi]]] = field(default_factory=dict)
    rules: list[LabelRule] = field(default_factory=list)  # what the ROIs were matched with

    def sources(self) -> dict:
        """JSON-ready account of the case: which ROI went to which label, what was left out and why."""
        return {"labels": {a.label: [x.roi for x in self.assigned if x.label == a.label] for a in self.assigned},
                "assigned": [asdict(a) for a in self.assigned], "unmatched": self.unmatched, "notes": self.notes,
                "problems": [{"code": c, "message": m} for c, m in self.problems]}


@dataclass
class StudyIndex:
    """Every image series and label object under a folder, tied together."""

    root: Path
    series: list[DicomSeries]
    objects: list[LabelObject]
    cases: list[LabelledCase]
    problems: list[tuple[str, str, str]]  # (case or object label, code, message) not tied to a case
    unlabelled: list[DicomSeries]
    skipped: dict[str, int]


def index_studies(root: str | Path, rules: list[LabelRule] | None, scan: DicomScan | None = None) -> StudyIndex:
    """Scans ``root`` (unless its ``scan`` is given) and ties each label object to its series (see the module
    docstring). With ``rules`` each case's ROIs are matched to labels; with None every distinct ROI name becomes
    its own label (:func:`roi_rules`).

    Raises:
        InputError: ``PATH_NOT_FOUND``.
    """
    from medseg.errors import require_exists

    root = Path(root)
    require_exists(root, "DICOM folder")
    if scan is None:
        scan = scan_paths(root, [root] if root.is_file() else walk_files(root))
    objects: list[LabelObject] = []
    problems: list[tuple[str, str, str]] = []
    skipped: dict[str, int] = {}
    for item in scan.skipped:
        if item.code == "DICOM_NOT_IMAGE":
            try:
                obj = read_label_object(item.path)
            except InputError as exc:
                problems.append((file_label(item.path), exc.code, exc.message))
                continue
            if obj is not None:
                objects.append(obj)
                continue
        key = item.code if item.code != "DICOM_NOT_IMAGE" else f"{item.code}: {item.reason}"
        skipped[key] = skipped.get(key, 0) + 1
    cases: dict[str, LabelledCase] = {}
    for obj in objects:
        series, problem = _referenced_series(obj, scan.series)
        if series is None:
            problems.append((obj.label, "LABEL_REFERENCE_MISSING", problem))
            continue
        case = cases.setdefault(series.name, LabelledCase(series.name, series, []))
        case.objects.append(obj)
        if problem:
            case.notes.append(problem)
    for case in cases.values():
        case.rules = rules if rules is not None else roi_rules([r.name for o in case.objects for r in o.rois])
        _match(case, case.rules)
    labelled = {c.series.name for c in cases.values()}
    return StudyIndex(root, scan.series, objects, sorted(cases.values(), key=lambda c: c.id), problems,
                      [s for s in scan.series if s.name not in labelled], skipped)


def only_object(index: StudyIndex, path: Path, rules: list[LabelRule] | None) -> StudyIndex:
    """``index`` cut down to the label object in ``path`` and its series, its ROIs matched again with ``rules``
    (as for :func:`index_studies`): ``medseg convert -i RS.dcm`` converts that object, not a newer one beside it."""
    chosen = [o for o in index.objects if Path(o.path).resolve() == Path(path).resolve()]
    cases = []
    for case in index.cases:
        objects = [o for o in case.objects if o in chosen]
        if objects:
            fresh = LabelledCase(case.id, case.series, objects)
            fresh.rules = rules if rules is not None else roi_rules([r.name for o in objects for r in o.rois])
            _match(fresh, fresh.rules)
            cases.append(fresh)
    problems = [p for p in index.problems if chosen and p[0] == chosen[0].label]
    return StudyIndex(index.root, [c.series for c in cases], chosen, cases, problems, [], index.skipped)


def _referenced_series(obj: LabelObject, all_series: list[DicomSeries]) -> tuple[DicomSeries | None, str]:
    """The image series ``obj`` labels, or None and why."""
    in_study = [s for s in all_series if s.files[0].study_uid == obj.study_uid]
    found = [s for s in in_study if s.uid in obj.series_uids]
    how = "its referenced series"
    if not found and obj.sop_refs:
        found = [s for s in in_study if any(f.sop_instance in obj.sop_refs for f in s.files)]
        how = "the images its contours reference"
    if not found and not obj.series_uids and not obj.sop_refs and obj.frame_of_reference:
        same_frame = [s for s in in_study if s.files[0].frame_of_reference == obj.frame_of_reference]
        found, how = (same_frame, "its frame of reference") if len(same_frame) == 1 else ([], "")
    if len(found) > 1:  # one series UID split by orientation or matrix: the part holding referenced images
        found = sorted(found, key=lambda s: -sum(f.sop_instance in obj.sop_refs for f in s.files) - len(s.files) / 1e6)
    if found:
        return found[0], "" if how == "its referenced series" else f"{obj.label}: series found by {how}"
    wanted = ", ".join(f"series {uid_hash(u)}" for u in sorted(obj.series_uids)) or "no series UID"
    elsewhere = [s for s in all_series if s.uid in obj.series_uids or any(f.sop_instance in obj.sop_refs for f in s.files)]
    where = " (it is in another study)" if elsewhere else " (not in the folder)"
    return None, f"{obj.label} references {wanted}, which is not an image series of its study{where}"


def _match(case: LabelledCase, rules: list[LabelRule]) -> None:
    """Matches the case's ROIs to labels: fills assigned, unmatched, notes, problems and chosen."""
    by_label: dict[str, list[tuple[LabelObject, Roi]]] = {}
    for obj in case.objects:
        for roi in obj.rois:
            hits = [r for r in rules if r.matches(roi.name)]
            for reason, count in roi.skipped.items():
                case.notes.append(f"ROI {roi.name!r} of {obj.label}: {count} {reason} contour(s) skipped")
            if len(hits) > 1:
                case.problems.append(("LABEL_ROI_AMBIGUOUS", f"ROI {roi.name!r} of {obj.label} matches labels "
                                      f"{', '.join(r.name for r in hits)}"))
            elif not hits:
                case.unmatched.append(roi.name)
            elif roi.parts == 0:
                case.notes.append(f"ROI {roi.name!r} of {obj.label} is empty (no usable contour or frame): skipped")
            else:
                by_label.setdefault(hits[0].name, []).append((obj, roi))
    for rule in rules:
        found = by_label.get(rule.name, [])
        owners = {id(o): o for o, _ in found}
        if len(owners) > 1:
            newest = max(owners.values(), key=lambda o: (o.when, str(o.path)))
            older = [o.label for o in owners.values() if o is not newest]
            case.notes.append(f"label {rule.name!r}: ROIs in {len(owners)} label objects; the newest ({newest.label}) "
                              f"is used, not {', '.join(older)}")
            found = [(o, r) for o, r in found if o is newest]
        if found:
            case.chosen[rule.name] = found
            case.assigned.extend(Assigned(rule.name, r.name, o.kind, file_label(o.path)) for o, r in found)
        elif rule.required:
            case.problems.append(("LABEL_ROI_MISSING", f"no non-empty ROI matches label {rule.name!r} "
                                  f"(ROIs: {', '.join(repr(r.name) for o in case.objects for r in o.rois) or 'none'})"))


# ------------------------------------------------------------------------------------------------- rasterisation
ON_EDGE = 1e-3  # pixel: a centre this close to a contour edge is on it (inside)
CROSSINGS_PER_PIXEL = 4  # a contour crossing a slice's rows more often than this is refused (memory bound)


def fill_even_odd(polygons: list[np.ndarray], rows: int, columns: int) -> np.ndarray:
    """``(rows, columns)`` mask of the pixel centres inside ``polygons`` (each ``(n, 2)`` as (column, row) pixel
    coordinates, closed implicitly) by the even-odd rule over all of them, plus the centres on an edge (see
    the module docstring)."""
    counts = np.zeros((rows, columns + 1), np.int32)
    on_edge = np.zeros((rows, columns), bool)
    for poly in polygons:
        _mark_edges(poly, on_edge)
        x0, y0 = poly[:, 0], poly[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        start = np.clip(np.ceil(np.minimum(y0, y1)), 0, rows).astype(np.int64)
        stop = np.clip(np.ceil(np.maximum(y0, y1)), 0, rows).astype(np.int64)
        n = stop - start
        if not n.any():
            continue
        if int(n.sum()) > CROSSINGS_PER_PIXEL * rows * columns:
            raise InputError("DICOM_UNREADABLE", f"a contour of {len(poly)} points crosses the image rows {int(n.sum())} "
                             f"times (more than {CROSSINGS_PER_PIXEL} per pixel): not a drawn outline",
                             "re-export the structure set")
        edge = np.repeat(np.arange(len(n)), n)  # n >= 0: start and stop are clipped alike
        first = np.cumsum(n) - n
        row = start[edge] + (np.arange(len(edge)) - first[edge])
        x = x0[edge] + (row - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
        np.add.at(counts, (row, np.clip(np.ceil(x), 0, columns).astype(np.int64)), 1)
    return (np.cumsum(counts[:, :columns], axis=1) & 1).astype(bool) | on_edge


def _mark_edges(poly: np.ndarray, out: np.ndarray) -> None:
    """Marks the pixel centres that lie on an edge of ``poly`` (within :data:`ON_EDGE`): every edge is walked at
    the integer steps of its longer axis, and a step whose other coordinate is an integer is a centre on it."""
    start, end = poly, np.roll(poly, -1, axis=0)
    along_x = np.abs(end[:, 0] - start[:, 0]) >= np.abs(end[:, 1] - start[:, 1])
    for axis, keep in ((0, along_x), (1, ~along_x)):  # the edges that run mostly along x, then those mostly along y
        a, b = start[keep], end[keep]
        size = out.shape[1 - axis]  # only steps inside the image matter (and far-away points stay cheap)
        lo = np.clip(np.ceil(np.minimum(a[:, axis], b[:, axis]) - ON_EDGE), 0, size).astype(np.int64)
        hi = np.clip(np.floor(np.maximum(a[:, axis], b[:, axis]) + ON_EDGE), -1, size - 1).astype(np.int64)
        n = np.maximum(hi - lo + 1, 0)
        if not n.any():
            continue
        if int(n.sum()) > CROSSINGS_PER_PIXEL * out.size:
            raise InputError("DICOM_UNREADABLE", f"a contour of {len(poly)} points passes {int(n.sum())} pixel steps "
                             f"(more than {CROSSINGS_PER_PIXEL} per pixel): not a drawn outline", "re-export the structure set")
        edge = np.repeat(np.arange(len(n)), n)
        step = lo[edge] + (np.arange(len(edge)) - (np.cumsum(n) - n)[edge])
        span = b[edge, axis] - a[edge, axis]
        t = np.where(span != 0, (step - a[edge, axis]) / np.where(span != 0, span, 1), 0.0)
        other = a[edge, 1 - axis] + t * (b[edge, 1 - axis] - a[edge, 1 - axis])
        hit = np.abs(other - np.round(other)) <= ON_EDGE
        xy = np.empty((int(hit.sum()), 2), np.int64)
        xy[:, axis], xy[:, 1 - axis] = step[hit], np.round(other[hit]).astype(np.int64)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < out.shape[1]) & (xy[:, 1] >= 0) & (xy[:, 1] < out.shape[0])
        out[xy[inside, 1], xy[inside, 0]] = True


@dataclass
class _Slices:
    """Each slice's own geometry, in the loaded volume's slice order."""

    origins: np.ndarray  # (Z, 3) LPS mm
    rows_dir: np.ndarray  # (Z, 3): direction of increasing column (DICOM's row cosine)
    cols_dir: np.ndarray  # (Z, 3): direction of increasing row
    normals: np.ndarray
    spacing: np.ndarray  # (Z, 2): between rows, between columns
    sops: list[str]
    frame_of_reference: str
    step: float

    @classmethod
    def of(cls, files: list[DicomFile]) -> _Slices:
        cosines = np.stack([f.orientation for f in files]).astype(float)  # type: ignore[misc]
        origins = np.stack([f.position for f in files]).astype(float)  # type: ignore[misc]
        normals = np.cross(cosines[:, :3], cosines[:, 3:])
        depth = (origins - origins[0]) @ normals[0]
        step = float(np.median(np.abs(np.diff(depth)))) if len(files) > 1 else 1.0
        return cls(origins, cosines[:, :3], cosines[:, 3:], normals,
                   np.asarray([f.pixel_spacing for f in files], float), [f.sop_instance for f in files],
                   files[0].frame_of_reference, step if step > 0 else 1.0)

    def place(self, points: np.ndarray) -> tuple[int, float]:
        """The slice whose plane holds ``points`` ``(n, 3)`` and the largest distance of a point from it (mm)."""
        centre = points.mean(axis=0)
        depth = np.einsum("kd,kd->k", centre - self.origins, self.normals)
        k = int(np.argmin(np.abs(depth)))
        return k, float(np.abs((points - self.origins[k]) @ self.normals[k]).max())

    def pixels(self, points: np.ndarray, k: int) -> np.ndarray:
        """Patient points on slice ``k`` -> (column, row) pixel coordinates."""
        offset = points - self.origins[k]
        return np.stack([offset @ self.rows_dir[k] / self.spacing[k, 1], offset @ self.cols_dir[k] / self.spacing[k, 0]], 1)


def _decimals(item: Any, keyword: str, obj: LabelObject, roi: Roi) -> np.ndarray:
    """A DS multi-value as float64, parsed by numpy from the stored bytes (pydicom's DSfloat objects take 5 s for
    the contours of one CT structure set).

    Raises:
        InputError: ``DICOM_UNREADABLE`` for values that are not finite decimal numbers.
    """
    if keyword not in item:
        return np.zeros(0)
    element = item.get_item(keyword)
    value = element.value
    try:
        if isinstance(value, bytes):
            data = np.array(value.strip(b" \x00").split(b"\\")).astype(np.float64) if value.strip() else np.zeros(0)
        else:
            data = np.asarray([float(v) for v in (value if isinstance(value, list | tuple) else [value]) if v != ""], float)
    except (ValueError, TypeError):
        data = np.asarray([np.nan])
    if not np.isfinite(data).all():
        raise InputError("DICOM_UNREADABLE", f"ROI {roi.name!r} of {obj.label}: a contour's {keyword} holds values "
                         "that are not finite decimal numbers", "re-export the structure set")
    return data


def _ordered_files(series: DicomSeries, image) -> list[DicomFile]:
    by_path = {str(f.path): f for f in series.files}
    return [by_path[str(p)] for p in image.meta["dicom_files"]]


def rasterise_rtstruct(obj: LabelObject, rois: list[Roi], files: list[DicomFile], shape: tuple[int, int, int],
                       notes: list[str]) -> dict[int, np.ndarray]:
    """``{ROI number: (Z, Y, X) mask}`` (slice, row, column) of ``rois`` of an RTSTRUCT on the series whose slices
    are ``files``; ``shape`` is the volume's ``(X, Y, Z)``.

    Raises:
        DatasetError: ``RTSTRUCT_CONTOUR_OFF_GRID``.
    """
    import pydicom

    ds = pydicom.dcmread(obj.path)
    slices = _Slices.of(files)
    wanted = {r.number: r for r in rois}
    polygons: dict[int, dict[int, list[np.ndarray]]] = {n: {} for n in wanted}
    tolerance = PLANE_TOLERANCE * slices.step
    for roi_contour in _seq(ds, "ROIContourSequence"):
        number = int(roi_contour.get("ReferencedROINumber", -1))
        if number not in wanted:
            continue
        roi = wanted[number]
        if roi.frame_of_reference and slices.frame_of_reference and roi.frame_of_reference != slices.frame_of_reference:
            raise DatasetError("RTSTRUCT_CONTOUR_OFF_GRID", f"ROI {roi.name!r} of {obj.label} is in another frame of "
                               "reference than its series", "export the structure set against this image series")
        outside = 0
        for contour in _seq(roi_contour, "ContourSequence"):
            if str(contour.get("ContourGeometricType", "")) != "CLOSED_PLANAR":
                continue
            data = _decimals(contour, "ContourData", obj, roi)
            if data.size < 9 or data.size % 3:
                continue
            points = data.reshape(-1, 3)
            k, distance = slices.place(points)
            if distance > tolerance:
                raise DatasetError(
                    "RTSTRUCT_CONTOUR_OFF_GRID",
                    f"ROI {roi.name!r} of {obj.label}: a contour lies {distance:.2f} mm from the nearest slice plane "
                    f"(at most {tolerance:.2f} mm, a quarter of the {slices.step:.2f} mm slice step)",
                    "the structure set was drawn on another series or slice spacing: export it against this series")
            pixel = slices.pixels(points, k)
            margin = 0.5 + 1e-3  # a contour around a border pixel runs half a pixel beyond its centre
            if (pixel.min(0) < -margin).any() or pixel[:, 0].max() > shape[0] - 1 + margin or pixel[:, 1].max() > shape[1] - 1 + margin:
                outside += 1
            polygons[number].setdefault(k, []).append(pixel)
        if outside:
            notes.append(f"ROI {roi.name!r} of {obj.label}: {outside} contour(s) reach outside the image (clipped)")
    masks = {}
    for number, per_slice in polygons.items():
        planes = np.zeros(shape[::-1], bool)  # (Z, rows, columns): each slice contiguous while it is filled
        for k, polys in per_slice.items():
            planes[k] = fill_even_odd(polys, shape[1], shape[0])
        masks[number] = planes
    return masks


def rasterise_seg(obj: LabelObject, rois: list[Roi], files: list[DicomFile], shape: tuple[int, int, int]) -> dict[int, np.ndarray]:
    """``{segment number: (Z, Y, X) mask}`` of ``rois`` of a DICOM-SEG, its frames placed by position.

    Raises:
        DatasetError: ``SEG_FRAME_OFF_GRID``; InputError ``DICOM_UNREADABLE`` when highdicom cannot read it.
    """
    import highdicom as hd

    try:  # frames decoded one at a time, as wanted: a SEG of 100 segments would not fit in memory at once
        seg = hd.seg.segread(obj.path, lazy_frame_retrieval=True)
    except Exception as exc:  # noqa: BLE001 - any failure to decode a third-party object is this code
        raise InputError("DICOM_UNREADABLE", f"{obj.label} cannot be read as a segmentation: {type(exc).__name__}") from None

    def frame_pixels(i: int) -> np.ndarray:
        try:
            return seg.get_stored_frame(i + 1)
        except Exception as exc:  # noqa: BLE001 - as above
            raise InputError("DICOM_UNREADABLE", f"{obj.label}: frame {i + 1} cannot be decoded: {type(exc).__name__}") from None

    slices = _Slices.of(files)
    fractional = str(seg.get("SegmentationType", "BINARY")) == "FRACTIONAL"
    threshold = float(seg.get("MaximumFractionalValue", 1) or 1) / 2 if fractional else 0.5
    groups = _seq(seg, "SharedFunctionalGroupsSequence")
    shared = groups[0] if groups else None
    wanted = {r.number for r in rois}
    masks = {n: np.zeros(shape[::-1], bool) for n in wanted}
    by_sop = {sop: k for k, sop in enumerate(slices.sops)}
    off = f"{obj.label}: a frame is not on the series' grid"

    def functional(frame: Any, sequence: str, keyword: str) -> Any:
        for group in (frame, shared):
            items = _seq(group, sequence) if group is not None else []
            if items and keyword in items[0]:
                return items[0].get(keyword)
        return None

    if (int(seg.Rows), int(seg.Columns)) != (shape[1], shape[0]):
        raise DatasetError("SEG_FRAME_OFF_GRID", f"{off} ({seg.Rows} x {seg.Columns} pixels, the series "
                           f"{shape[1]} x {shape[0]})", "export the segmentation against this image series")
    for i, frame in enumerate(_seq(seg, "PerFrameFunctionalGroupsSequence")):
        number = int(functional(frame, "SegmentIdentificationSequence", "ReferencedSegmentNumber") or 0)
        if number not in wanted:
            continue
        position = functional(frame, "PlanePositionSequence", "ImagePositionPatient")
        if position is not None:
            k, distance = slices.place(np.asarray([float(v) for v in position], float)[None])
            orientation = functional(frame, "PlaneOrientationSequence", "ImageOrientationPatient")
            in_plane = np.abs(slices.pixels(np.asarray([float(v) for v in position], float)[None], k)).max()
            turned = orientation is not None and not np.allclose(
                [float(v) for v in orientation], np.r_[slices.rows_dir[k], slices.cols_dir[k]], atol=1e-3)
            spacing = functional(frame, "PixelMeasuresSequence", "PixelSpacing")
            scaled = spacing is not None and not np.allclose([float(v) for v in spacing], slices.spacing[k], rtol=1e-3)
            if distance > PLANE_TOLERANCE * slices.step or in_plane > IN_PLANE_TOLERANCE or turned or scaled:
                raise DatasetError("SEG_FRAME_OFF_GRID", f"{off} ({distance:.2f} mm from the nearest slice plane, "
                                   f"{in_plane:.2f} pixel in plane{', turned' if turned else ''}"
                                   f"{', other pixel spacing' if scaled else ''})",
                                   "export the segmentation against this image series")
        else:
            sources = [str(s.get("ReferencedSOPInstanceUID", "")) for d in _seq(frame, "DerivationImageSequence")
                       for s in _seq(d, "SourceImageSequence")]
            hits = [by_sop[s] for s in sources if s in by_sop]
            if not hits:
                raise DatasetError("SEG_FRAME_OFF_GRID", f"{off} (no position and no source image of the series)")
            k = hits[0]
        masks[number][k] |= frame_pixels(i) >= threshold
    return masks


def label_map(case: LabelledCase, rules: list[LabelRule], image) -> np.ndarray:
    """The case's ``(X, Y, Z)`` uint8 label map on ``image`` (its series, as loaded by :func:`medseg.io.dicom.load_series`).

    Raises:
        DatasetError: the case's first problem, ``RTSTRUCT_CONTOUR_OFF_GRID``, ``SEG_FRAME_OFF_GRID``.
    """
    if case.problems:
        code, message = case.problems[0]
        raise DatasetError(code, f"{case.id}: {message}", "run `medseg validate` for every case's ROIs")
    shape = tuple(image.spatial_shape)
    if "resampled" in image.meta or len(shape) != 3:
        raise DatasetError("RTSTRUCT_CONTOUR_OFF_GRID", f"{case.id}: the series was resampled (gantry tilt) or is not a "
                           "volume, so its label objects' slices do not map to it")
    files = _ordered_files(case.series, image)
    out = np.zeros(shape[::-1], np.uint8)  # (Z, Y, X) while painting: each slice contiguous
    for rule in sorted(rules, key=lambda r: r.priority):
        chosen = case.chosen.get(rule.name, [])
        union = np.zeros(shape[::-1], bool)
        for obj in {id(o): o for o, _ in chosen}.values():
            rois = [r for o, r in chosen if o is obj]
            if obj.kind == "RTSTRUCT":
                masks = rasterise_rtstruct(obj, rois, files, shape, case.notes)
            else:
                masks = rasterise_seg(obj, rois, files, shape)
            for roi in rois:
                if not masks[roi.number].any():
                    case.notes.append(f"ROI {roi.name!r} of {obj.label} covers no pixel centre of the series")
                union |= masks[roi.number]
        if rule.required and chosen and not union.any():
            raise DatasetError("LABEL_ROI_MISSING", f"{case.id}: the ROIs of label {rule.name!r} cover no pixel")
        out[union] = rule.value
    return out.transpose(2, 1, 0)  # F-ordered (X, Y, Z): NIfTI's own order, no copy


# ------------------------------------------------------------------------------------------------ materialisation
def default_cache() -> Path:
    """Where rasterised DICOM-study datasets are kept: ``$MEDSEG_CACHE_DIR/dicom-labels``, else
    ``$XDG_CACHE_HOME/medseg/dicom-labels`` (``~/.cache/medseg/dicom-labels``)."""
    if os.environ.get("MEDSEG_CACHE_DIR"):
        return Path(os.environ["MEDSEG_CACHE_DIR"]) / "dicom-labels"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "medseg" / "dicom-labels"


def _cache_key(root: Path, rules: list[LabelRule]) -> str:
    digest = hashlib.sha256(RASTER_VERSION.encode())
    digest.update(json.dumps([(r.name, r.value, [p.pattern for p in r.patterns], r.required, r.priority) for r in rules]).encode())
    digest.update(os.path.abspath(root).encode())
    for path in walk_files(root):
        try:
            st = path.stat()
        except OSError:
            continue
        digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def materialise(root: str | Path, rules: list[LabelRule], cache: Path | None = None,
                tolerances=None) -> tuple[Path, dict]:
    """Writes the labelled cases of a DICOM-study folder as a paired dataset (``images/<case>.nii.gz``,
    ``labels/<case>.nii.gz``, ``labels.json``, ``sources.json``) under ``cache`` (:func:`default_cache`), keyed by
    the folder's files (path, size, modification time) and the rules; reused while neither changes. Written to a
    temporary folder and renamed, so a killed run leaves no half dataset.

    Returns:
        The dataset folder and its ``sources.json``: per case the ROIs of each label, unmatched ROIs, notes; the
        failed cases and label objects under ``problems`` (``[case, code, message]``).
    """
    root = Path(root)
    target = (cache or default_cache()) / _cache_key(root, rules)[:20]
    if (target / "sources.json").is_file():
        return target, json.loads((target / "sources.json").read_text())
    index = index_studies(root, rules)
    _remove_abandoned(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_cases(index, rules, tmp, tolerances)
    except BaseException:  # a full disk, Ctrl-C: no half dataset stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: use its result
        shutil.rmtree(tmp, ignore_errors=True)
    return target, json.loads((target / "sources.json").read_text())


def _remove_abandoned(target: Path) -> None:
    """Removes the temporary folders of runs that were killed while writing ``target`` (their process is gone)."""
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            os.kill(int(tmp.name.split(".")[-2]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # a live process of another user
            pass


def _write_cases(index: StudyIndex, rules: list[LabelRule], tmp: Path, tolerances) -> None:
    """The labelled cases of ``index`` as a paired dataset in ``tmp``; failed cases go to ``sources.json``."""
    from medseg.io.dicom import load_series
    from medseg.io.nifti import write_nifti

    (tmp / "images").mkdir(parents=True)
    (tmp / "labels").mkdir()
    sources: dict[str, Any] = {"cases": {}, "problems": [list(p) for p in index.problems],
                               "unlabelled_series": len(index.unlabelled), "skipped": index.skipped}
    for case in index.cases:
        sources["cases"][case.id] = case.sources()
        if case.problems:
            sources["problems"].extend([case.id, code, message] for code, message in case.problems)
            continue
        try:
            image = load_series(case.series, tolerances=tolerances)
            labels = label_map(case, rules, image)
        except MedsegError as exc:
            if exc.code == "DISK_FULL":
                raise
            sources["problems"].append([case.id, exc.code, exc.message])
            continue
        write_nifti(image, tmp / "images" / f"{case.id}.nii.gz")
        write_nifti(image.with_array(labels[None]), tmp / "labels" / f"{case.id}.nii.gz")
        sources["cases"][case.id] = case.sources()  # with the rasterisation's notes
    modalities = [c.series.files[0].modality for c in index.cases if c.series.files[0].modality]
    sources["modality"] = max(set(modalities), key=modalities.count) if modalities else ""
    names = {"0": "background", **{str(r.value): r.name for r in rules}}
    (tmp / "labels.json").write_text(json.dumps(names, indent=1))
    (tmp / "sources.json").write_text(json.dumps(sources, indent=1))


def holds_dicom(folder: Path) -> bool:
    """True when a file below ``folder`` is DICOM (the first 20 files of each folder are looked at; stops at the
    first hit)."""
    from medseg.io.dicom_headers import is_dicom_file

    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        if any(is_dicom_file(Path(dirpath) / f) for f in sorted(filenames)[:20]):
            return True
    return False


def is_study_folder(folder: Path) -> bool:
    """True for a folder of DICOM files and no label-map files directly in it (``evaluate --ref``)."""
    from medseg.io.readers import is_supported

    if not folder.is_dir() or any(p.is_file() and is_supported(p) for p in folder.iterdir()):
        return False
    return holds_dicom(folder)


def roi_summary(sources: dict) -> str:
    """``label <- ROI, ROI; label <- ...`` over every case: the report's account of where each reference came from."""
    found: dict[str, list[str]] = {}
    for case in sources.get("cases", {}).values():
        for label, rois in case["labels"].items():
            found.setdefault(label, [])
            found[label].extend(r for r in rois if r not in found[label])
    return "; ".join(f"{label} <- {', '.join(rois)}" for label, rois in found.items())
