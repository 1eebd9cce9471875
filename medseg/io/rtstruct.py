"""RT Structure Set (RTSTRUCT) output: one ROI per foreground label, closed planar contours on every source slice.

Why pydicom and not rt-utils: rt-utils builds the dataset from a folder path, copies the source header wholesale
(including modules a derived object must not repeat), has no place for the algorithm identification, writes
full-precision floats (DS values over 16 characters, which a planning system rejected) and needs OpenCV; highdicom
has no RTSTRUCT. The dataset here is a few dozen attributes, built to the IOD and checked by ``dciodvfy`` in the
tests; rt-utils is kept as the *independent reader* of the round-trip test.

Contours are the 0.5 iso-lines of each slice's mask (marching squares, :func:`skimage.measure.find_contours`),
so they run half-way between a structure's pixel centres and its neighbours': the enclosed area is the mask's
area and a reader that fills by pixel centre (even-odd rule) gets the mask back exactly. Each connected component
gives one contour, each hole another (inside its component, so the even-odd rule every planning system uses
makes it a hole); collinear points are dropped. Coordinates come from each slice's own ImagePositionPatient,
ImageOrientationPatient and PixelSpacing (oblique and jittered series too), in mm, written with at most 4
decimals (DS values of at most 16 characters). Every contour references its slice's SOP instance; the structure
set references the source's frame of reference, study, series and all of its instances.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np

from medseg.io.dicom_derived import (
    SERIES_NUMBER_OFFSET,
    Producer,
    contributing_equipment,
    copy_patient_study,
    label_colour,
)
from medseg.io.dicom_seg import foreground_values, source_datasets
from medseg.io.volume import Volume

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # what RT Referenced Study Sequence names (PS3.3 C.8.8.5)


def ds_text(value: float) -> str:
    """``value`` as a DICOM DS string of at most 16 characters (4 decimals, trailing zeros dropped)."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        from pydicom.valuerep import format_number_as_ds

        text = format_number_as_ds(float(value))
    return text


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours ``(n, 2)`` in (row, column) pixel coordinates of a 2D boolean mask ``(rows, columns)``:
    outer boundaries and holes alike, without the repeated closing point and without collinear points."""
    from skimage.measure import approximate_polygon, find_contours

    if not mask.any():
        return []
    padded = np.pad(mask.astype(np.float32), 1)
    contours = []
    for contour in find_contours(padded, 0.5):
        contour = approximate_polygon(contour, tolerance=0.0) - 1.0
        if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
            contour = contour[:-1]
        if len(contour) >= 3:
            contours.append(contour)
    return contours


def _patient_points(contour: np.ndarray, header) -> np.ndarray:
    """(row, column) pixel coordinates of one slice -> patient coordinates (mm, LPS) ``(n, 3)``."""
    origin = np.asarray([float(v) for v in header.ImagePositionPatient])
    cosines = np.asarray([float(v) for v in header.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
    along_row, along_column = cosines[:3], cosines[3:]  # direction of increasing column / increasing row
    return origin + np.outer(contour[:, 1] * column_spacing, along_row) + np.outer(contour[:, 0] * row_spacing, along_column)


def _image_ref(header):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    return item


def _referenced_frame(first, sources: list):
    """The Referenced Frame of Reference item: the source series and each of its images, in its study."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = first.SeriesInstanceUID
    series_ref.ContourImageSequence = Sequence([_image_ref(h) for h in sources])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = STUDY_COMPONENT_SOP_CLASS
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    for_ref = Dataset()
    for_ref.FrameOfReferenceUID = str(first.FrameOfReferenceUID)
    for_ref.RTReferencedStudySequence = Sequence([study_ref])
    return for_ref


def _roi(number: int, value: int, name: str, data: np.ndarray, sources: list, producer: Producer) -> tuple:
    """One label's Structure Set ROI, ROI Contour (closed planar contours per source slice) and RT ROI Observation."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    roi = Dataset()
    roi.ROINumber = number
    roi.ReferencedFrameOfReferenceUID = str(sources[0].FrameOfReferenceUID)
    roi.ROIName = name[:64]
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = producer.description
    contour_items: list = []
    for k, header in enumerate(sources):
        for contour in slice_contours(data[:, :, k].T == value):  # (rows, columns)
            item = Dataset()
            item.ContourImageSequence = Sequence([_image_ref(header)])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(contour)
            item.ContourNumber = len(contour_items) + 1
            item.ContourData = [ds_text(v) for v in _patient_points(contour, header).ravel()]
            contour_items.append(item)
    roi_contour = Dataset()
    roi_contour.ROIDisplayColor = list(label_colour(value))
    roi_contour.ReferencedROINumber = number
    if contour_items:
        roi_contour.ContourSequence = Sequence(contour_items)
    observation = Dataset()
    observation.ObservationNumber = number
    observation.ReferencedROINumber = number
    observation.ROIObservationLabel = roi.ROIName
    observation.RTROIInterpretedType = producer.code(name).rt_type
    observation.ROIInterpreter = ""
    return roi, roi_contour, observation


def build_rtstruct(labels: Volume, source: Volume, label_names: dict[int, str], producer: Producer | None = None):
    """The RTSTRUCT dataset of ``labels`` (``(1, X, Y, Z)`` on ``source``'s grid; see :func:`write_rtstruct`)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    producer = producer or Producer("medseg")
    sources = source_datasets(labels, source, "RTSTRUCT")
    values = foreground_values(labels, label_names)
    first = sources[0]
    now = datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the SeriesDescription has an em dash
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = producer.uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    copy_patient_study(first, ds)
    # RT Series and General Equipment
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = producer.uid()
    ds.SeriesNumber = int(first.get("SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET
    ds.SeriesDate, ds.SeriesTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.SeriesDescription = producer.series_description
    ds.OperatorsName = ""
    ds.Manufacturer = "medseg"
    ds.ManufacturerModelName = producer.model[:64]
    ds.SoftwareVersions = producer.version or "0"
    ds.ContributingEquipmentSequence = Sequence([contributing_equipment(producer)])
    # Frame of Reference: the source's
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    # Structure Set
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "medseg"
    ds.StructureSetName = producer.model[:64]
    ds.StructureSetDescription = producer.description
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ReferencedFrameOfReferenceSequence = Sequence([_referenced_frame(first, sources)])
    # Structure Set ROI, ROI Contour and RT ROI Observations: one ROI per label
    parts = [_roi(number, value, str(label_names[value]), labels.array[0], sources, producer)
             for number, value in enumerate(values, start=1)]
    ds.StructureSetROISequence = Sequence([roi for roi, _, _ in parts])
    ds.ROIContourSequence = Sequence([contour for _, contour, _ in parts])
    ds.RTROIObservationsSequence = Sequence([observation for _, _, observation in parts])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    pydicom.dataset.validate_file_meta(meta, enforce_standard=True)
    return ds


def write_rtstruct(labels: Volume, source: Volume, path: str | Path, label_names: dict[int, str],
                   producer: Producer | None = None) -> Path:
    """Writes ``labels`` (``(1, X, Y, Z)`` integer map on ``source``'s grid) as an RTSTRUCT file (atomically).

    Args:
        labels: Label map from :meth:`Predictor.predict` for ``source``.
        source: The DICOM series volume as read by :func:`medseg.io.dicom.read_dicom`.
        path: Output file.
        label_names: ``{label value: name}``: one ROI per foreground name, coloured as in the previews.
        producer: The model that made it (:mod:`medseg.io.dicom_derived`).

    Raises:
        OutputError: ``DICOM_SEG_NO_SOURCE``, ``DICOM_SEG_GRID_MISMATCH``, ``DICOM_SEG_LABELS`` (as for DICOM-SEG).
    """
    from medseg.fsutil import atomic_write

    dataset = build_rtstruct(labels, source, label_names, producer)
    return atomic_write(Path(path), lambda tmp: dataset.save_as(tmp, enforce_file_format=True))
