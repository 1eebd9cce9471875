"""medseg's RTSTRUCT/SEG reading against the field's own tools, run for real: plastimatch (its PyPI wheel ships the
binaries) rasterises the same structure sets, rt-utils and pydicom's shipped ``rtstruct.dcm`` are structure sets
medseg did not write, and dcmqi's ``itkimage2segimage`` writes a SEG that must read back to dcmqi's own input.

Measured difference with plastimatch: none on the boundary (same pixel-centre rule, oblique series included);
plastimatch fills holes (it unites a ROI's contours on a slice instead of the even-odd rule that planning systems
and medseg use), so on a ROI with holes plastimatch's mask is medseg's with the holes filled, exactly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import rotated_affine, series, tool
from dicom_label_helpers import PRODUCER, shapes
from scipy import ndimage

from medseg.io.dicom import load_series, read_dicom
from medseg.io.dicom_labels import index_studies, label_map, label_rules
from medseg.io.readers import read_volume
from medseg.io.rtstruct import write_rtstruct
from medseg.io.sitk_formats import write_sitk


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def filled(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every slice's holes filled (what plastimatch makes of a ROI with holes)."""
    return np.stack([ndimage.binary_fill_holes(mask[..., z]) for z in range(mask.shape[-1])], -1)


def medseg_masks(root: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Each ROI as medseg rasterises it (one optional label per name, so overlaps do not hide anything)."""
    out = {}
    for name in names:
        spec = {"roi": {"patterns": ["^" + name.replace(" ", "") + "$"], "required": False}}
        (case,) = index_studies(root, label_rules(spec)).cases
        out[name] = label_map(case, label_rules(spec), load_series(case.series)) == 1
    return out


def plastimatch_masks(rtstruct: Path, series_folder: Path, out: Path, names: list[str]) -> dict[str, np.ndarray]:
    """plastimatch's rasterisation on the referenced series' grid, one NIfTI per structure."""
    subprocess.run([tool("plastimatch"), "convert", "--input", str(rtstruct), "--referenced-ct", str(series_folder),
                    "--output-prefix", str(out), "--prefix-format", "nii.gz"], check=True, capture_output=True)
    grid = read_dicom(series_folder)
    masks = {}
    for name in names:
        volume = read_volume(out / f"{name}.nii.gz")
        assert volume.same_grid(grid), name
        masks[name] = volume.array[0] > 0
    return masks


def test_plastimatch_agrees_on_medseg_structure_sets(tmp_path: Path):
    labels = shapes((48, 52, 7))  # label 1 has a hole with an island in it, label 2 none
    series(tmp_path / "ct", shape=labels.shape, affine=rotated_affine(spacing=(0.8, 0.7, 2.5)))
    source = read_dicom(tmp_path / "ct")
    write_rtstruct(source.with_array(labels[None]), source, tmp_path / "rt.dcm",
                   {0: "background", 1: "ring", 2: "boxes"}, PRODUCER)
    ours = medseg_masks(tmp_path, ["ring", "boxes"])
    theirs = plastimatch_masks(tmp_path / "rt.dcm", tmp_path / "ct", tmp_path / "pm", ["ring", "boxes"])
    np.testing.assert_array_equal(ours["boxes"], theirs["boxes"])
    np.testing.assert_array_equal(ours["ring"], labels == 1)
    np.testing.assert_array_equal(theirs["ring"], filled(ours["ring"]))  # plastimatch's only difference: it fills holes
    assert (theirs["ring"] & ~ours["ring"]).sum() > 100 and dice(ours["ring"], theirs["ring"]) > 0.9


def boundary(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` with a 4-neighbour outside it, per slice."""
    inner = np.stack([ndimage.binary_erosion(mask[..., z]) for z in range(mask.shape[-1])], -1)
    return mask & ~inner


def test_structure_set_written_by_rt_utils(tmp_path: Path):
    """rt-utils draws contours through the centres of a mask's boundary pixels (OpenCV): medseg's centre-inside-or-on
    rule gives its input mask back; plastimatch leaves out boundary pixels, so it agrees with medseg to Dice >= 0.98
    only on structures large against their boundary, and differs on boundary pixels (and holes) only."""
    from rt_utils import RTStructBuilder

    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    affine[:3, 3] = (-20, 15, -40)
    labels = shapes((96, 90, 7))
    x, y = np.mgrid[:96, :90]
    disc = np.repeat((np.hypot(x - 55.2, y - 48.7) < 38)[..., None], 7, axis=2)
    masks = {"Ring": labels == 1, "Boxes": labels == 2, "Body": disc}
    series(tmp_path / "ct", shape=labels.shape, affine=affine)
    rt = RTStructBuilder.create_new(dicom_series_path=str(tmp_path / "ct"))
    order = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in read_dicom(tmp_path / "ct").meta["dicom_files"]]
    by_uid = {s.SOPInstanceUID: k for k, s in enumerate(rt.series_data)}
    for name, mask in masks.items():
        theirs_order = np.zeros((labels.shape[1], labels.shape[0], len(order)), bool)  # rt-utils: (rows, columns, its slices)
        for z, uid in enumerate(order):
            theirs_order[:, :, by_uid[uid]] = mask[..., z].T
        rt.add_roi(mask=theirs_order, name=name)
    rt.save(str(tmp_path / "rt.dcm"))
    ours = medseg_masks(tmp_path, list(masks))
    theirs = plastimatch_masks(tmp_path / "rt.dcm", tmp_path / "ct", tmp_path / "pm", list(masks))
    np.testing.assert_array_equal(ours["Ring"], masks["Ring"])
    np.testing.assert_array_equal(ours["Body"], masks["Body"])
    staircase = np.zeros(labels.shape, bool)
    for k in range(6):  # the diagonal line of pixels shapes() draws on slice 3
        staircase[10 + k, 2 + k, 3] = True
    np.testing.assert_array_equal(ours["Boxes"], masks["Boxes"] & ~staircase)  # a one-pixel diagonal has no area
    assert dice(ours["Body"], theirs["Body"]) >= 0.98, dice(ours["Body"], theirs["Body"])
    for name in masks:
        assert not (theirs[name] & ~filled(ours[name])).any(), name
        assert (boundary(ours[name]) | ~filled(ours[name]) | theirs[name]).all(), name  # plastimatch lacks boundary pixels only


def test_pydicoms_shipped_structure_set(tmp_path: Path):
    """pydicom's ``rtstruct.dcm`` (no preamble, a 'patient' outline on three slices, two POINT isocentres) on a
    series built to its frame of reference and slice positions."""
    from pydicom.data import get_testdata_file

    rt = pydicom.dcmread(get_testdata_file("rtstruct.dcm"), force=True)
    frame = rt.ReferencedFrameOfReferenceSequence[0]
    series_uid = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID
    affine = np.diag([-4.0, -4.0, 10.0, 1.0])  # LPS (-256, -256, -200) as RAS, 4 mm pixels, 10 mm slices
    affine[:3, 3] = (256, 256, -200)
    series(tmp_path / "ct", shape=(128, 128, 3), affine=affine, study_uid=rt.StudyInstanceUID, series_uid=series_uid,
           frame_of_reference_uid=frame.FrameOfReferenceUID)
    rt.file_meta = pydicom.dataset.FileMetaDataset()
    rt.file_meta.MediaStorageSOPClassUID, rt.file_meta.MediaStorageSOPInstanceUID = rt.SOPClassUID, rt.SOPInstanceUID
    rt.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    rt.save_as(tmp_path / "rt.dcm", enforce_file_format=True)
    (case,) = index_studies(tmp_path, label_rules({"body": ["patient"], "iso": {"patterns": ["isocenter"], "required": False}})).cases
    ours = label_map(case, label_rules({"body": ["patient"]}), load_series(case.series)) == 1
    assert any("POINT" in note for note in case.notes) and any("empty" in note for note in case.notes)
    theirs = plastimatch_masks(tmp_path / "rt.dcm", tmp_path / "ct", tmp_path / "pm", ["patient"])["patient"]
    assert ours.sum() > 3000 and dice(ours, theirs) >= 0.98, dice(ours, theirs)


def test_dcmqi_seg_reads_back_to_its_input(tmp_path: Path):
    labels = shapes((48, 52, 7))
    series(tmp_path / "ct", shape=labels.shape, affine=rotated_affine(spacing=(0.8, 0.7, 2.5)))
    source = read_dicom(tmp_path / "ct")
    write_sitk(source.with_array(labels[None].astype(np.int16)), tmp_path / "labels.nrrd")

    def segment(label_id: int, name: str, code: str) -> dict:
        return {"labelID": label_id, "SegmentLabel": name, "SegmentDescription": name, "SegmentAlgorithmType": "MANUAL",
                "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                                                          "CodeMeaning": "Anatomical Structure"},
                "SegmentedPropertyTypeCodeSequence": {"CodeValue": code, "CodingSchemeDesignator": "SCT",
                                                      "CodeMeaning": name}}

    meta = {"ContentCreatorName": "Reader1", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
            "SeriesDescription": "Segmentation", "SeriesNumber": "300", "InstanceNumber": "1",
            "segmentAttributes": [[segment(1, "Kidney", "64033007"), segment(2, "Spleen", "78961009")]]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "seg").mkdir()
    result = subprocess.run([tool("itkimage2segimage"), "--inputImageList", str(tmp_path / "labels.nrrd"),
                             "--inputDICOMDirectory", str(tmp_path / "ct"), "--outputDICOM", str(tmp_path / "seg" / "seg.dcm"),
                             "--inputMetadata", str(tmp_path / "meta.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    seg = pydicom.dcmread(tmp_path / "seg" / "seg.dcm", stop_before_pixels=True)
    assert int(seg.NumberOfFrames) < 2 * labels.shape[2]  # dcmqi leaves out empty frames: segments cover part
    spec = {"kidney": ["kidney"], "spleen": ["spleen"]}
    (case,) = index_studies(tmp_path, label_rules(spec)).cases
    np.testing.assert_array_equal(label_map(case, label_rules(spec), load_series(case.series)), labels)


@pytest.mark.parametrize("binary", ["plastimatch", "itkimage2segimage"])
def test_the_tools_are_installed(binary: str):
    assert tool(binary), f"{binary} comes with the test extra (pip install medseg[test])"
