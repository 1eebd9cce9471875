"""Builders of the PACS tests: a synthetic multi-series study, and an independent RTSTRUCT decoder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from dicom_helpers import CANARY_ID, CANARY_NAME
from pydicom.uid import generate_uid

from medseg.io.dicom_write import write_dicom_series
from medseg.io.readers import read_volume
from medseg.io.volume import Volume


def non_image_object(folder: Path, study_uid: str) -> Path:
    """A Basic Text SR (a report: no pixels, no geometry) in the study."""
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid(), study_uid
    ds.Modality, ds.PatientName, ds.PatientID = "SR", CANARY_NAME, CANARY_ID
    ds.SeriesNumber, ds.InstanceNumber, ds.ValueType = 9, 1, "CONTAINER"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta = meta
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / "sr.dcm", enforce_file_format=True)
    return folder / "sr.dcm"


@dataclass
class Study:
    uid: str
    ct: list[Path]  # the series to segment
    ct_folder: Path
    others: list[Path]  # localizer and report


def write_study(folder: Path, dataset: Path, *, missing_slice: bool = False) -> Study:
    """A study of the tiny dataset's test CT (canary patient), a one-slice localizer and a text report; with
    ``missing_slice`` the CT series lacks one inner slice."""
    image = read_volume(sorted((dataset / "imagesTs").glob("*.nii.gz"))[0])
    study = generate_uid()
    kwargs = dict(study_uid=study, patient_name=CANARY_NAME, patient_id=CANARY_ID)
    ct = write_dicom_series(image, folder / "ct", series_number=2, **kwargs)
    if missing_slice:
        ct[len(ct) // 2].unlink()
        ct = [f for f in ct if f.exists()]
    localizer = write_dicom_series(Volume(np.ascontiguousarray(image.array[..., :1]), image.affine), folder / "loc",
                                   series_number=1, **kwargs)
    return Study(study, ct, folder / "ct", localizer + [non_image_object(folder / "sr", study)])


def rtstruct_masks(series_folder: Path, rtstruct: Path) -> dict[str, np.ndarray]:
    """Each ROI of ``rtstruct`` as a mask ``(X, Y, Z)`` on the series' grid, decoded by a second reader: rt-utils
    loads and orders the series, finds each slice's contours by referenced SOP instance and maps them to pixel
    coordinates; the polygons are filled by pixel centre with the even-odd rule (skimage), as planning systems do.

    rt-utils' own ``get_roi_mask_by_name`` is not used: it rounds vertices to whole pixels and fills them with
    their boundary (OpenCV), which grows every structure by up to a pixel, and it swaps row and column spacing,
    which misplaces contours on pixels that are not square."""
    from rt_utils import RTStructBuilder, image_helper
    from rt_utils.ds_helper import get_contour_sequence_by_roi_number
    from skimage.draw import polygon2mask

    rt = RTStructBuilder.create_from(str(series_folder), str(rtstruct))
    to_pixels = image_helper.get_patient_to_pixel_transformation_matrix(rt.series_data)
    first = rt.series_data[0]
    shape = (int(first.Columns), int(first.Rows), len(rt.series_data))  # (X, Y, Z)
    masks = {}
    for roi in rt.ds.StructureSetROISequence:
        contours = get_contour_sequence_by_roi_number(rt.ds, roi.ROINumber)
        mask = np.zeros(shape, bool)
        for z, image in enumerate(rt.series_data):
            for data in image_helper.get_slice_contour_data(image, contours):
                points = image_helper.apply_transformation_to_3d_points(np.reshape(np.asarray(data, float), (-1, 3)),
                                                                        to_pixels)
                mask[..., z] ^= polygon2mask(shape[:2], points[:, :2])
        masks[roi.ROIName] = mask
    return masks
