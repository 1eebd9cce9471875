"""Writing a volume as a single-frame DICOM image series (synthetic data, tests, benchmarks).

This is how medseg produces DICOM inputs for its sample data and tests (CT or MR Image Storage, explicit VR
little endian, one file per slice). It is not a clinical export: the patient module holds whatever the caller
passes (tests plant canary identifiers there on purpose).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.io.volume import LPS_TO_RAS, Volume

SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def _ds(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def _series_header(modality: str, patient_name: str, patient_id: str, series_number: int, unit: np.ndarray,
                   spacing: np.ndarray, shape: tuple, intercept: float, slope: float):
    """The attributes every slice of a written series shares (patient, study, equipment, plane, pixel format)."""
    import pydicom

    ds = pydicom.Dataset()
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.Modality, ds.Manufacturer = modality, "medseg synthetic"
    ds.SeriesNumber = series_number
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [_ds(v) for v in (*unit[:, 0], *unit[:, 1])]
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
    ds.SliceThickness = _ds(spacing[2])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = shape[1], shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = _ds(intercept), _ds(slope)
    if modality == "CT":
        ds.RescaleType, ds.KVP = "HU", "120"
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = "10", "500", "1"
    ds.AcquisitionNumber = 1
    return ds


def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    modality: str = "CT",
    patient_name: str = "Synthetic^Phantom",
    patient_id: str = "SYNTHETIC",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    rescale_intercept: float = 0.0,
    rescale_slope: float = 1.0,
    series_number: int = 1,
    file_names: str = "slice_{:04d}.dcm",
) -> list[Path]:
    """Writes ``volume`` ``(1, X, Y, Z)`` as one DICOM file per ``Z`` slice.

    Stored values are ``(voxel - intercept) / slope`` rounded to int16, so integer volumes round-trip exactly
    with slope 1. The affine's columns must be orthogonal (DICOM has no sheared single-frame stacks).

    Returns:
        The written paths, in slice order.

    Raises:
        InputError: ``SHAPE_INVALID`` for non-3D or multi-channel volumes; ``AFFINE_INVALID`` for sheared affines.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    if volume.array.ndim != 4 or volume.array.shape[0] != 1:
        raise InputError("SHAPE_INVALID", f"expected a (1, X, Y, Z) volume, found {volume.array.shape}")
    lps = LPS_TO_RAS @ volume.affine
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    unit = axes / spacing
    if np.abs(unit.T @ unit - np.eye(3)).max() > 1e-6:
        raise InputError("AFFINE_INVALID", "the affine is sheared; a DICOM series needs orthogonal axes")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    sop_class = SOP_CLASSES[modality]
    stored = np.round((volume.array[0].astype(np.float64) - rescale_intercept) / rescale_slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise InputError("VALUE_RANGE", "values do not fit int16 after rescaling")
    stored = stored.astype(np.int16)
    header = _series_header(modality, patient_name, patient_id, series_number, unit, spacing, stored.shape,
                            rescale_intercept, rescale_slope)
    header.SOPClassUID = sop_class
    header.StudyInstanceUID, header.SeriesInstanceUID, header.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    paths = []
    for k in range(stored.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(sop_class)
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = copy.deepcopy(header)
        ds.file_meta = meta
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in (lps[:3, 3] + k * axes[:, 2])]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = Y, columns = X
        path = folder / file_names.format(k)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
