"""DICOM labels (RTSTRUCT, DICOM-SEG) read back exactly onto their series, ROI names matched to labels by the
config's patterns, and the messy inputs of real archives each refused with its code or handled as documented."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import rotated_affine, series
from dicom_label_helpers import PRODUCER, shapes, study

from medseg.errors import ConfigError, DatasetError
from medseg.io.dicom import load_series, read_dicom
from medseg.io.dicom_labels import (
    fill_even_odd,
    index_studies,
    label_map,
    label_rules,
    materialise,
    roi_key,
)
from medseg.io.rtstruct import write_rtstruct


def labelled(root: Path, spec) -> tuple:
    index = index_studies(root, label_rules(spec))
    assert len(index.cases) == 1, (index.problems, index.cases)
    case = index.cases[0]
    image = load_series(case.series)
    return case, image, label_map(case, label_rules(spec), image)


@pytest.mark.parametrize("kind", ["rtstruct", "seg"])
def test_writer_to_reader_is_exact_on_an_oblique_series(tmp_path: Path, kind: str):
    labels = shapes((48, 52, 7))
    source = study(tmp_path, labels, {0: "background", 1: "organ", 2: "lesion"}, kind=kind)
    case, image, out = labelled(tmp_path, {"organ": ["organ"], "lesion": ["lesion"]})
    assert image.same_grid(source)
    np.testing.assert_array_equal(out, labels)
    assert case.id.startswith("series_") and [a.roi for a in case.assigned] == ["organ", "lesion"]
    assert not case.unmatched and not case.problems


def test_flipped_series_and_jittered_positions(tmp_path: Path):
    """A series written with a negative slice direction, then each slice's position nudged by up to 0.02 mm in plane
    (real scanners' sub-voxel jitter): contours follow each slice's own position."""
    affine = np.diag([-0.9, 0.9, -3.0, 1.0])
    affine[:3, 3] = (100, -50, 20)
    labels = shapes((48, 52, 7))
    study(tmp_path, labels, {0: "background", 1: "organ", 2: "lesion"}, affine=affine)
    rng = np.random.default_rng(1)
    for path in sorted((tmp_path / "ct").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [float(v) + d for v, d in zip(ds.ImagePositionPatient, rng.uniform(-0.02, 0.02, 3))]
        ds.save_as(path)
    _, _, out = labelled(tmp_path, {"organ": ["organ"], "lesion": ["lesion"]})
    np.testing.assert_array_equal(out, labels)


def test_fill_rule_is_even_odd_by_pixel_centre():
    square = np.array([[0.5, 0.5], [4.5, 0.5], [4.5, 4.5], [0.5, 4.5]])
    hole = np.array([[1.5, 1.5], [3.5, 1.5], [3.5, 3.5], [1.5, 3.5]])
    island = np.array([[1.8, 1.8], [2.2, 1.8], [2.2, 2.2], [1.8, 2.2]])
    mask = fill_even_odd([square, hole, island], 6, 6)
    expected = np.zeros((6, 6), bool)
    expected[1:5, 1:5] = True
    expected[2:4, 2:4] = False
    expected[2, 2] = True  # the island's only pixel centre: (2, 2)
    np.testing.assert_array_equal(mask, expected)
    # the same contour drawn twice cancels (even-odd), a hole winding the same way as its outline is still a hole
    assert not fill_even_odd([square, square], 6, 6).any()
    # repeated points and a contour partly outside the image
    shifted = np.repeat(square, 2, axis=0) + [-3, 0]  # columns -2.5 .. 1.5: centres 0 and 1 inside the image
    clipped = np.zeros((6, 6), bool)
    clipped[1:5, 0:2] = True
    np.testing.assert_array_equal(fill_even_odd([shifted], 6, 6), clipped)
    # a centre exactly on an edge is inside: a contour through the centres of a mask's boundary gives the mask
    on_centres = np.array([[1, 1], [3, 1], [3, 3], [1, 3]], float)
    np.testing.assert_array_equal(fill_even_odd([on_centres], 5, 5)[1:4, 1:4], np.ones((3, 3), bool))
    diagonal = np.array([[1, 1], [3, 3], [1, 3]], float)  # an edge through (2, 2) at 45 degrees
    assert fill_even_odd([diagonal], 5, 5)[2, 2] and fill_even_odd([diagonal], 5, 5).sum() == 6


def test_patterns_case_space_and_aliases(tmp_path: Path):
    labels = shapes((40, 44, 5))
    names = {0: "background", 1: "GTV Primary", 2: "Spinal Cord"}
    study(tmp_path, labels, names)
    spec = {"tumour": ["^gtv", "tumou?r"], "cord": ["spinal ?cord", "^cord$"]}
    case, _, out = labelled(tmp_path, spec)
    np.testing.assert_array_equal(out, labels)
    assert {(a.label, a.roi) for a in case.assigned} == {("tumour", "GTV Primary"), ("cord", "Spinal Cord")}
    assert roi_key(" GTV_p  1 ") == "gtv_p1"
    with pytest.raises(ConfigError) as err:
        label_rules({"tumour": ["(unclosed"]})
    assert err.value.code == "CONFIG_INVALID_VALUE"
    from medseg.config import load_config

    with pytest.raises(ConfigError) as err:  # the config refuses it before any file is read
        load_config("smoke", ['data.labels={"tumour": ["(unclosed"]}'])
    assert err.value.code == "CONFIG_INVALID_VALUE" and "not a regular expression" in err.value.message
    short = load_config("smoke", ['data.labels={"tumour": "^gtv", "cord": {"patterns": ["cord"], "required": false}}'])
    assert [(r.name, r.value, r.required) for r in label_rules(short.data.labels)] == [("tumour", 1, True), ("cord", 2, False)]


def test_overlaps_later_label_wins_or_priority(tmp_path: Path):
    labels = shapes((40, 44, 5))
    study(tmp_path, labels, {0: "background", 1: "body", 2: "lesion"})
    # two ROIs overlapping: write 'body' as the union, so lesion lies inside body
    union = (labels > 0).astype(np.uint8)
    shutil.rmtree(tmp_path)
    source = study(tmp_path, union, {0: "background", 1: "body"})
    write_rtstruct(source.with_array((labels == 2)[None].astype(np.uint8)), source, tmp_path / "rt2.dcm",
                   {0: "background", 1: "lesion"}, PRODUCER)
    index = index_studies(tmp_path, label_rules({"body": ["body"], "lesion": ["lesion"]}))
    image = load_series(index.cases[0].series)
    later = label_map(index.cases[0], label_rules({"body": ["body"], "lesion": ["lesion"]}), image)
    assert (later == 2).sum() == (labels == 2).sum() and (later == 1).sum() == (labels == 1).sum()
    spec = {"body": {"patterns": ["body"], "priority": 5}, "lesion": {"patterns": ["lesion"], "priority": 1}}
    index = index_studies(tmp_path, label_rules(spec))
    ranked = label_map(index.cases[0], label_rules(spec), image)
    assert (ranked == 2).sum() == 0 and (ranked == 1).sum() == union.sum()


def _codes(index) -> set[str]:
    return {code for c in index.cases for code, _ in c.problems} | {code for _, code, _ in index.problems}


def test_missing_ambiguous_and_unmatched(tmp_path: Path):
    labels = shapes((40, 44, 5))
    study(tmp_path, labels, {0: "background", 1: "GTV-1", 2: "PTV"})
    index = index_studies(tmp_path, label_rules({"tumour": ["gtv"], "target": ["tv"]}))
    assert "LABEL_ROI_AMBIGUOUS" in _codes(index)
    index = index_studies(tmp_path, label_rules({"tumour": ["gtv"], "cord": ["cord"]}))
    assert _codes(index) == {"LABEL_ROI_MISSING"} and index.cases[0].unmatched == ["PTV"]
    index = index_studies(tmp_path, label_rules({"tumour": ["gtv"], "cord": {"patterns": ["cord"], "required": False}}))
    assert not _codes(index)
    with pytest.raises(DatasetError) as err:
        label_map(index_studies(tmp_path, label_rules({"cord": ["cord"]})).cases[0], label_rules({"cord": ["cord"]}),
                  load_series(index.cases[0].series))
    assert err.value.code == "LABEL_ROI_MISSING"


def test_reference_to_another_study_and_missing_series(tmp_path: Path):
    labels = shapes((40, 44, 5))
    study(tmp_path / "a", labels, {0: "background", 1: "organ", 2: "lesion"})
    rt = pydicom.dcmread(tmp_path / "a" / "rtstruct.dcm")
    rt.StudyInstanceUID = pydicom.uid.generate_uid()  # filed under another study than its series
    rt.save_as(tmp_path / "a" / "rtstruct.dcm")
    index = index_studies(tmp_path, label_rules({"organ": ["organ"]}))
    assert [(code, "another study" in message) for _, code, message in index.problems] == [("LABEL_REFERENCE_MISSING", True)]
    shutil.rmtree(tmp_path / "a" / "ct")
    index = index_studies(tmp_path, label_rules({"organ": ["organ"]}))
    assert [(code, "not in the folder" in message) for _, code, message in index.problems] == [("LABEL_REFERENCE_MISSING", True)]


def test_contour_off_the_slices_and_other_frame(tmp_path: Path):
    labels = shapes((40, 44, 5))
    study(tmp_path, labels, {0: "background", 1: "organ", 2: "lesion"})
    path = tmp_path / "rtstruct.dcm"
    rt = pydicom.dcmread(path)
    contour = rt.ROIContourSequence[0].ContourSequence[0]
    points = np.asarray(contour.ContourData, float).reshape(-1, 3)
    header = pydicom.dcmread(sorted((tmp_path / "ct").glob("*.dcm"))[0], stop_before_pixels=True)
    normal = np.cross(*np.asarray(header.ImageOrientationPatient, float).reshape(2, 3))
    contour.ContourData = [f"{v:.4f}" for v in (points + 1.25 * normal).ravel()]  # half-way between two slices
    rt.save_as(tmp_path / "off.dcm")
    path.unlink()
    spec = {"organ": ["organ"], "lesion": ["lesion"]}
    index = index_studies(tmp_path, label_rules(spec))
    with pytest.raises(DatasetError) as err:
        label_map(index.cases[0], label_rules(spec), load_series(index.cases[0].series))
    assert err.value.code == "RTSTRUCT_CONTOUR_OFF_GRID" and "1.25 mm" in err.value.message
    rt = pydicom.dcmread(tmp_path / "off.dcm")
    contour = rt.ROIContourSequence[0].ContourSequence[0]
    contour.ContourData = [f"{v:.4f}" for v in points.ravel()]
    rt.StructureSetROISequence[0].ReferencedFrameOfReferenceUID = pydicom.uid.generate_uid()
    rt.save_as(tmp_path / "off.dcm")
    index = index_studies(tmp_path, label_rules(spec))
    with pytest.raises(DatasetError) as err:
        label_map(index.cases[0], label_rules(spec), load_series(index.cases[0].series))
    assert err.value.code == "RTSTRUCT_CONTOUR_OFF_GRID" and "frame of reference" in err.value.message


def test_point_open_empty_and_duplicate_points(tmp_path: Path):
    labels = shapes((40, 44, 5))
    study(tmp_path, labels, {0: "background", 1: "organ", 2: "lesion"})
    path = tmp_path / "rtstruct.dcm"
    rt = pydicom.dcmread(path)
    organ = rt.ROIContourSequence[0]
    for contour in organ.ContourSequence:  # every point twice
        points = np.asarray(contour.ContourData, float).reshape(-1, 3)
        contour.ContourData = [f"{v:.4f}" for v in np.repeat(points, 2, axis=0).ravel()]
        contour.NumberOfContourPoints = 2 * len(points)
    marker = pydicom.Dataset()
    marker.ContourGeometricType = "POINT"
    marker.NumberOfContourPoints = 1
    marker.ContourData = organ.ContourSequence[0].ContourData[:3]
    organ.ContourSequence.append(marker)
    opened = pydicom.Dataset()
    opened.ContourGeometricType = "OPEN_PLANAR"
    opened.NumberOfContourPoints = 3
    opened.ContourData = organ.ContourSequence[0].ContourData[:9]
    organ.ContourSequence.append(opened)
    del rt.ROIContourSequence[1].ContourSequence  # 'lesion' left without contours: an empty ROI
    rt.save_as(path)
    spec = {"organ": ["organ"], "lesion": {"patterns": ["lesion"], "required": False}}
    case, _, out = labelled(tmp_path, spec)
    np.testing.assert_array_equal(out, np.where(labels == 1, 1, 0))
    notes = " ".join(case.notes)
    assert "1 POINT contour(s) skipped" in notes and "1 OPEN_PLANAR contour(s) skipped" in notes
    assert "'lesion'" in notes and "empty" in notes
    index = index_studies(tmp_path, label_rules({"organ": ["organ"], "lesion": ["lesion"]}))
    assert _codes(index) == {"LABEL_ROI_MISSING"}  # an empty ROI does not satisfy a required label


def test_two_structure_sets_for_one_series_the_newer_wins(tmp_path: Path):
    labels = shapes((40, 44, 5))
    source = study(tmp_path, labels, {0: "background", 1: "organ", 2: "lesion"})
    smaller = np.where(labels == 1, 1, 0).astype(np.uint8)
    smaller[:, :, 2] = 0
    write_rtstruct(source.with_array(smaller[None]), source, tmp_path / "revised.dcm", {0: "background", 1: "organ"}, PRODUCER)
    for name, date in (("rtstruct.dcm", "20240101"), ("revised.dcm", "20250101")):
        ds = pydicom.dcmread(tmp_path / name)
        ds.StructureSetDate = date
        ds.save_as(tmp_path / name)
    case, _, out = labelled(tmp_path, {"organ": ["organ"], "lesion": {"patterns": ["lesion"], "required": False}})
    np.testing.assert_array_equal(out == 1, smaller == 1)
    np.testing.assert_array_equal(out == 2, labels == 2)  # only the older object has 'lesion': used
    assert any("newest" in n for n in case.notes)


def test_seg_covering_part_of_the_series_and_fractional(tmp_path: Path):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    labels = shapes((40, 44, 6))
    series(tmp_path / "ct", shape=labels.shape, affine=rotated_affine(spacing=(0.8, 0.7, 2.5)))
    source = read_dicom(tmp_path / "ct")
    headers = [pydicom.dcmread(f) for f in source.meta["dicom_files"]]
    part = slice(2, 5)
    frames = (labels[:, :, part] == 1).transpose(2, 1, 0).astype(np.float32) * 0.75  # fractional, above one half
    description = hd.seg.SegmentDescription(
        1, "Liver", codes.SCT.Organ, codes.SCT.Liver, hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(headers[part], frames, hd.seg.SegmentationTypeValues.FRACTIONAL, [description],
                              hd.UID(), 5, hd.UID(), 1, "x", "x", "1", "1", max_fractional_value=255)
    seg.save_as(tmp_path / "seg.dcm")
    _, _, out = labelled(tmp_path, {"liver": ["liver"]})
    expected = np.zeros_like(labels)
    expected[:, :, part] = labels[:, :, part] == 1
    np.testing.assert_array_equal(out, expected)


def test_materialised_dataset_is_cached_and_names_no_patient(tmp_path: Path):
    labels = shapes((40, 44, 5))
    study(tmp_path / "data" / "Canary_Patient" / "study1", labels, {0: "background", 1: "organ", 2: "lesion"})
    rules = label_rules({"organ": ["organ"], "lesion": ["lesion"]})
    folder, sources = materialise(tmp_path / "data", rules, tmp_path / "cache")
    again, _ = materialise(tmp_path / "data", rules, tmp_path / "cache")
    assert again == folder and len(list((tmp_path / "cache").iterdir())) == 1
    (case_id,) = sources["cases"]
    assert sorted(p.name for p in (folder / "labels").iterdir()) == [f"{case_id}.nii.gz"]
    assert "Canary" not in (folder / "sources.json").read_text() and sources["modality"] == "CT"
    (tmp_path / "data" / "Canary_Patient" / "study1" / "rtstruct.dcm").touch()  # a changed file: a new key
    materialise(tmp_path / "data", rules, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_materialise_leaves_nothing_half_written(tmp_path: Path, monkeypatch):
    """A full disk mid-way removes the partial dataset and stops (not a per-case problem); a folder a killed run left
    behind (its process gone) is removed by the next run."""
    import medseg.io.nifti
    from medseg.errors import OutputError

    study(tmp_path / "data", shapes((40, 44, 5)), {0: "background", 1: "organ", 2: "lesion"})
    rules = label_rules({"organ": ["organ"], "lesion": ["lesion"]})
    real = medseg.io.nifti.write_nifti

    def full(*args, **kwargs):
        raise OutputError("DISK_FULL", "no space left on the device")

    monkeypatch.setattr(medseg.io.nifti, "write_nifti", full)
    with pytest.raises(OutputError) as err:
        materialise(tmp_path / "data", rules, tmp_path / "cache")
    assert err.value.code == "DISK_FULL"
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(medseg.io.nifti, "write_nifti", real)
    folder, _ = materialise(tmp_path / "data", rules, tmp_path / "cache")
    shutil.rmtree(folder)
    abandoned = folder.with_name(f".{folder.name}.999999999.tmp")
    (abandoned / "images").mkdir(parents=True)
    materialise(tmp_path / "data", rules, tmp_path / "cache")
    assert not abandoned.exists() and folder.is_dir()


def test_non_finite_contour_data_is_refused(tmp_path: Path):
    from medseg.errors import InputError

    study(tmp_path, shapes((40, 44, 5)), {0: "background", 1: "organ", 2: "lesion"})
    rt = pydicom.dcmread(tmp_path / "rtstruct.dcm")
    contour = rt.ROIContourSequence[0].ContourSequence[0]
    contour.ContourData = ["NaN", *list(contour.ContourData)[1:]]
    rt.save_as(tmp_path / "rtstruct.dcm")
    spec = {"organ": ["organ"], "lesion": ["lesion"]}
    (case,) = index_studies(tmp_path, label_rules(spec)).cases
    with pytest.raises(InputError) as err:
        label_map(case, label_rules(spec), load_series(case.series))
    assert err.value.code == "DICOM_UNREADABLE" and "'organ'" in err.value.message


def test_convert_one_structure_set_file(tmp_path: Path):
    """``convert -i RS.dcm``: the series it references (found beside it) and its label map; a revised structure set
    beside it is not mixed in; NRRD output keeps the series' grid."""
    from medseg.io.convert import convert
    from medseg.io.readers import read_volume

    labels = shapes((40, 44, 5))
    source = study(tmp_path / "in", labels, {0: "background", 1: "GTV 1", 2: "Cord"})
    series(tmp_path / "in" / "other", shape=(20, 20, 4), seed=3)  # another series in the folder: not converted
    write_rtstruct(source.with_array(np.where(labels == 1, 1, 0)[None].astype(np.uint8)), source,
                   tmp_path / "in" / "revised.dcm", {0: "background", 1: "GTV 2"}, PRODUCER)
    report = convert(tmp_path / "in" / "rtstruct.dcm", tmp_path / "out" / "ct.nrrd")
    assert report.ok and [r.name.endswith("labels") for r in report.results] == [False, True]
    written = read_volume(tmp_path / "out" / "ct_labels.nrrd")
    assert written.same_grid(source)
    np.testing.assert_array_equal(written.array[0], labels)
    names = __import__("json").loads((tmp_path / "out" / "ct_labels.json").read_text())
    assert names["values"] == {"0": "background", "1": "GTV 1", "2": "Cord"}
    assert names["labels"] == {"GTV 1": ["GTV 1"], "Cord": ["Cord"]}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ct.nrrd", "ct_labels.json", "ct_labels.nrrd"]


def test_hostile_contours_stay_cheap_or_are_refused():
    """Points far outside the image cost nothing (edges are clipped to it); an outline crossing the rows more than
    4 times per pixel (a zigzag of 20,000 points) is refused before memory is spent on it."""
    from medseg.errors import InputError

    huge = np.array([[-1e12, -1e12], [1e12, -1e12], [1e12, 1e12], [-1e12, 1e12]])
    assert fill_even_odd([huge], 40, 44).all()
    zigzag = np.stack([np.arange(20000) % 44, np.where(np.arange(20000) % 2, -5.0, 50.0)], 1)
    with pytest.raises(InputError) as err:
        fill_even_odd([zigzag], 40, 44)
    assert err.value.code == "DICOM_UNREADABLE" and "per pixel" in err.value.message


def test_exact_and_per_roi_rules():
    from medseg.io.dicom_labels import exact_rules, roi_rules

    rules = exact_rules({0: "background", 1: "Liver", 3: "GTV primary"})
    assert [(r.name, r.value, r.required) for r in rules] == [("Liver", 1, True), ("GTV primary", 3, True)]
    assert rules[1].matches("gtv  PRIMARY") and not rules[1].matches("GTV primary 2")
    assert [(r.name, r.value, r.required) for r in roi_rules(["Cord", "CORD", "Lung"])] == [("Cord", 1, False), ("Lung", 2, False)]
