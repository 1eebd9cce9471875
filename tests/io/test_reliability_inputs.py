"""RELIABILITY.md input cases 1-20: each builds the bad input and checks the stable code and the message."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_helpers import edit, rotated_affine, series, tool

from medseg.errors import MedsegError
from medseg.io.dicom import read_dicom, scan_dicom
from medseg.io.nifti import read_nifti, write_nifti
from medseg.io.validate import validate_dataset
from medseg.io.volume import Volume


def _code(fn, *args, **kwargs) -> MedsegError:
    with pytest.raises(MedsegError) as info:
        fn(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------- DICOM (1-13)


def test_01_non_dicom_files_are_skipped_and_counted(tmp_path: Path):
    volume, _ = series(tmp_path / "s")
    (tmp_path / "s" / "README").write_text("exported by PACS")
    (tmp_path / "s" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 200)
    scan = scan_dicom(tmp_path / "s")
    assert len(scan.series) == 1 and scan.skipped_summary() == {"DICOM_NOT_DICOM": 2}
    assert np.array_equal(read_dicom(tmp_path / "s").array, volume.array)
    # a file without the preamble is not guessed at (no force=True)
    assert _code(read_dicom, tmp_path / "s" / "README").code == "DICOM_NOT_DICOM"


def test_02_truncated_pixel_data_fails_with_byte_counts(tmp_path: Path, monkeypatch):
    from medseg.io import dicom

    _, files = series(tmp_path / "s", shape=(16, 16, 5))
    data = files[2].read_bytes()
    files[2].write_bytes(data[:-100])

    def no_buffer(*args, **kwargs):
        raise AssertionError("a pixel buffer was allocated for a truncated series")

    monkeypatch.setattr(dicom, "_read_stack", no_buffer)  # refused in the preflight, before any allocation
    err = _code(read_dicom, tmp_path / "s")
    assert err.code == "DICOM_TRUNCATED"
    # the file is named by its instance number and series hash, never by its file name (PHI)
    number = pydicom.dcmread(files[2], stop_before_pixels=True).InstanceNumber
    assert "412 bytes, expected 512" in err.message and f"instance {number} of series" in err.message
    assert files[2].name not in err.message


def test_03_non_image_objects_are_skipped_and_listed_by_sop_class(tmp_path: Path):
    from pydicom.data import get_testdata_file

    series(tmp_path / "s", shape=(8, 8, 4))
    for name in ("test-SR.dcm", "rtplan.dcm", "liver_1frame.dcm"):
        (tmp_path / "s" / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    scan = scan_dicom(tmp_path / "s")
    summary = scan.skipped_summary()
    assert summary == {
        "DICOM_NOT_IMAGE: Comprehensive SR Storage": 1,
        "DICOM_NOT_IMAGE: RT Plan Storage": 1,
        "DICOM_NOT_IMAGE: Segmentation Storage": 1,
    }
    assert read_dicom(tmp_path / "s").spatial_shape == (8, 8, 4)


def test_04_missing_transfer_syntax_and_missing_decoder(tmp_path: Path, monkeypatch):
    _, files = series(tmp_path / "s", shape=(8, 8, 3))
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.file_meta.TransferSyntaxUID
        ds.save_as(f, enforce_file_format=False, implicit_vr=False, little_endian=True)
    err = _code(read_dicom, tmp_path / "s")
    assert err.code == "DICOM_NO_TRANSFER_SYNTAX" and "TransferSyntaxUID" in err.message

    # a compressed file whose decoder plugins are missing is refused at preflight, naming what to install
    import pydicom.pixels.decoders.base as base
    from pydicom.data import get_testdata_file

    monkeypatch.setattr(base.Decoder, "is_available", property(lambda self: False))
    err = _code(read_dicom, get_testdata_file("MR_small_jp2klossless.dcm"))
    assert err.code == "DICOM_DECODER_MISSING" and "JPEG 2000" in err.message
    assert "pip install pylibjpeg pylibjpeg-openjpeg" in (err.hint or "")


def test_05_several_series_in_one_folder_give_one_output_each(tmp_path: Path):
    from medseg.io.convert import convert

    a, _ = series(tmp_path / "in" / "x", shape=(8, 8, 4), seed=1)
    b, _ = series(tmp_path / "in" / "y", shape=(10, 8, 5), seed=2)
    assert _code(read_dicom, tmp_path / "in").code == "DICOM_MULTIPLE_SERIES"
    report = convert(tmp_path / "in", tmp_path / "out")
    assert report.ok and len(report.results) == 2
    shapes = sorted(read_nifti(r.output).spatial_shape for r in report.results)
    assert shapes == [(8, 8, 4), (10, 8, 5)]
    assert all(Path(r.output).name.startswith("series_00") for r in report.results)


def test_06_too_few_slices_is_skipped_with_a_reason(tmp_path: Path):
    series(tmp_path / "s", shape=(8, 8, 2))
    err = _code(read_dicom, tmp_path / "s")
    assert err.code == "DICOM_TOO_FEW_SLICES" and "2 slice(s)" in err.message


def test_07_orientation_differing_between_slices_fails(tmp_path: Path):
    _, files = series(tmp_path / "s", shape=(8, 8, 5), affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    edit(files[3], ImageOrientationPatient=[-1, 0, 0, 0, -0.99, 0.01])
    err = _code(read_dicom, tmp_path / "s")
    assert err.code == "DICOM_ORIENTATION_INCONSISTENT" and "0.01" in err.message


def test_08_missing_slice_fails_and_says_where(tmp_path: Path):
    _, files = series(tmp_path / "s", shape=(8, 8, 8), affine=np.diag([1.0, 1.0, 2.5, 1.0]))
    files[4].unlink()
    for f in files[:4] + files[5:]:
        edit(f, SpacingBetweenSlices="2.5")  # the tag claims even spacing: it must not be trusted
    err = _code(read_dicom, tmp_path / "s")
    assert err.code == "DICOM_SLICE_GAP"
    assert "sorted slices 3 and 4" in err.message and "instance numbers 4 and 6" in err.message
    assert "5.000 mm" in err.message and "2.500 mm" in err.message


def test_09_gantry_tilt_fails_unless_opted_in_and_is_recorded(tmp_path: Path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    volume, files = series(tmp_path / "s", shape=(16, 16, 6), affine=affine)
    for k, f in enumerate(files):  # shear: each slice shifted 0.5 mm along y (~14 degrees)
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * k, z]
        ds.save_as(f)
    err = _code(read_dicom, tmp_path / "s")
    assert err.code == "DICOM_GANTRY_TILT" and "--allow-tilt" in (err.hint or "")
    fixed = read_dicom(tmp_path / "s", allow_tilt=True)
    assert fixed.meta["gantry_tilt_degrees"] == pytest.approx(np.degrees(np.arctan(0.5 * 5 / 10)), abs=0.01)
    assert np.allclose(fixed.affine, volume.affine)  # orthogonal grid anchored at the first slice
    # slice k was moved by 0.5k mm along y (the row axis, 1 mm pixels); resampling moves it back, so on the
    # orthogonal grid slice 4 equals the written slice shifted by 2 whole pixels
    expected = volume.array[0, :, :, 4].astype(np.float32)
    assert np.allclose(fixed.array[0, :, 2:, 4], expected[:, :14])
    assert not np.allclose(fixed.array[0, :, :, 4], expected)


def test_10_all_slices_at_one_position_fail(tmp_path: Path):
    _, files = series(tmp_path / "s", shape=(8, 8, 4), affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    for f in files:
        edit(f, ImagePositionPatient=["0", "0", "0"])
    err = _code(read_dicom, tmp_path / "s")
    assert err.code == "DICOM_NOT_A_VOLUME" and "4 slices" in err.message


def test_10b_duplicate_positions_fail(tmp_path: Path):
    _, files = series(tmp_path / "s", shape=(8, 8, 4), affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    ds = pydicom.dcmread(files[1])
    edit(files[2], ImagePositionPatient=ds.ImagePositionPatient)
    assert _code(read_dicom, tmp_path / "s").code == "DICOM_DUPLICATE_POSITION"


def test_11_multiframe_uses_per_frame_positions_or_fails(tmp_path: Path):
    import highdicom as hd

    volume, files = series(tmp_path / "s", shape=(12, 10, 6))
    sources = [pydicom.dcmread(f) for f in files]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=sources, series_instance_uid=hd.UID(), series_number=9, sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    enhanced.save_as(tmp_path / "enhanced.dcm")
    read = read_dicom(tmp_path / "enhanced.dcm")
    assert np.abs(read.affine - volume.affine).max() < 1e-4
    assert np.array_equal(read.array, volume.array)

    from pydicom.data import get_testdata_file

    err = _code(read_dicom, get_testdata_file("SC_rgb_rle_2frame.dcm"))
    assert err.code == "DICOM_NO_GEOMETRY" and "never assumed" in (err.hint or "")


def test_12_rescale_applied_per_slice_in_float32(tmp_path: Path):
    volume, files = series(tmp_path / "s", shape=(8, 8, 4), affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    edit(files[1], RescaleSlope="0.5", RescaleIntercept="-3.25")
    edit(files[2], RescaleSlope=None, RescaleIntercept=None)  # missing: identity
    read = read_dicom(tmp_path / "s")
    assert read.array.dtype == np.float32 and read.meta["rescale_varies"]
    raw = volume.array[0].astype(np.float32)
    assert np.array_equal(read.array[0, :, :, 0], raw[:, :, 0])
    assert np.allclose(read.array[0, :, :, 1], raw[:, :, 1] * 0.5 - 3.25)
    assert np.array_equal(read.array[0, :, :, 2], raw[:, :, 2])


@pytest.mark.skipif(tool("dcm2niix") is None, reason="dcm2niix wheel not installed")
@pytest.mark.parametrize("affine", [rotated_affine(), np.diag([-0.8, 0.8, 3.0, 1.0])], ids=["oblique", "flipped"])
def test_13_affine_matches_dcm2niix(tmp_path: Path, affine):
    import subprocess

    volume, _ = series(tmp_path / "s", affine=affine)
    subprocess.run([tool("dcm2niix"), "-z", "y", "-f", "ref", "-o", str(tmp_path), str(tmp_path / "s")],
                   check=True, capture_output=True)
    ours = read_dicom(tmp_path / "s")
    theirs = nib.as_closest_canonical(nib.load(tmp_path / "ref.nii.gz"))
    mine = nib.as_closest_canonical(nib.Nifti1Image(ours.array[0].astype(np.float32), ours.affine))
    assert np.abs(theirs.affine - mine.affine).max() < 0.1
    assert np.array_equal(np.asarray(theirs.dataobj).astype(np.float32), np.asarray(mine.dataobj))


# ---------------------------------------------------------------- NIfTI and other volumes (14-17)


def test_14_corrupt_gzip_is_refused_reading_the_data(tmp_path: Path, make_volume):
    path = write_nifti(make_volume(), tmp_path / "a.nii.gz")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flips bits inside the compressed voxels: header still reads
    path.write_bytes(bytes(data))
    assert nib.load(path).shape == (20, 18, 9)
    err = _code(read_nifti, path)
    assert err.code == "NIFTI_CORRUPT" and "a.nii.gz" in err.message


def test_15_nan_or_inf_voxels_fail(tmp_path: Path):
    for bad in (np.nan, np.inf):
        data = np.zeros((4, 4, 4), np.float32)
        data[1, 2, 3] = bad
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "x.nii.gz")
        err = _code(read_nifti, tmp_path / "x.nii.gz")
        assert err.code == "NIFTI_NONFINITE" and "NaN or Inf" in err.message


def test_16_sheared_affine_fails_and_qform_sform_disagreement_is_recorded(tmp_path: Path, caplog):
    sheared = np.eye(4)
    sheared[0, 1] = 0.3
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), sheared)
    img.set_sform(sheared, code=1)
    nib.save(img, tmp_path / "sheared.nii.gz")
    err = _code(read_nifti, tmp_path / "sheared.nii.gz")
    assert err.code == "AFFINE_SHEARED" and "sform" in err.message

    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    img.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    img.set_qform(np.eye(4), code=1)
    nib.save(img, tmp_path / "disagree.nii.gz")
    volume = read_nifti(tmp_path / "disagree.nii.gz")
    assert volume.meta["qform_sform_disagree"] and volume.meta["nifti_transform"] == "sform"
    assert volume.spacing == (2.0, 2.0, 2.0)
    assert "qform and sform disagree" in caplog.text


def test_17_bad_dimensions_and_oversized_headers_fail_before_allocating(tmp_path: Path, make_volume):
    nib.save(nib.Nifti1Image(np.zeros((4, 0, 4), np.int16), np.eye(4)), tmp_path / "empty.nii")
    assert _code(read_nifti, tmp_path / "empty.nii").code == "SHAPE_INVALID"

    # a header announcing 64 GB in a tiny gzip file (decompression bomb): refused from the header alone
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 2048))
    header.set_data_dtype(np.float32)
    with gzip.open(tmp_path / "bomb.nii.gz", "wb") as fh:
        fh.write(header.binaryblock + b"\x00" * 4)
    err = _code(read_nifti, tmp_path / "bomb.nii.gz")
    assert err.code == "IMAGE_TOO_LARGE" and "137.4 GB" in err.message

    # an uncompressed file shorter than its header says
    path = write_nifti(make_volume(), tmp_path / "short.nii")
    path.write_bytes(path.read_bytes()[:-50])
    err = _code(read_nifti, path)
    assert err.code == "NIFTI_CORRUPT" and "truncated" in (err.hint or "")

    # 4D where 3D single-channel is expected: the dataset check reports the channel count
    root = _msd(tmp_path / "ds", [("a", np.zeros((6, 6, 6, 2), np.int16), np.zeros((6, 6, 6), np.uint8))])
    problems = validate_dataset(root).problems
    assert [(p.case_id, p.code) for p in problems] == [("a", "CHANNELS_MISMATCH")]
    assert "2 channel(s)" in problems[0].message and "declares 1" in problems[0].message


# ---------------------------------------------------------------- datasets (18-20)


def _msd(root: Path, cases, labels=None) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for cid, image, label in cases:
        affine = image[1] if isinstance(image, tuple) else np.eye(4)
        image = image[0] if isinstance(image, tuple) else image
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{cid}.nii.gz")
        laffine = label[1] if isinstance(label, tuple) else affine
        label = label[0] if isinstance(label, tuple) else label
        nib.save(nib.Nifti1Image(label, laffine), root / "labelsTr" / f"{cid}.nii.gz")
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    meta = {"name": "t", "modality": {"0": "CT"}, "labels": labels or {"0": "background", "1": "organ"},
            "numTraining": len(training), "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize(
    "label_affine, what",
    [
        (np.diag([1.0, 1.0, 1.5, 1.0]), "spacing"),
        (np.array([[1, 0, 0, 5.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "origin"),
        (np.diag([-1.0, 1.0, 1.0, 1.0]), "direction"),
    ],
)
def test_18_image_label_geometry_mismatch_fails(tmp_path: Path, label_affine, what):
    image = np.zeros((6, 6, 6), np.int16)
    root = _msd(tmp_path / "ds", [("a", image, (np.zeros((6, 6, 6), np.uint8), label_affine))])
    problems = validate_dataset(root).problems
    assert [p.code for p in problems] == ["IMAGE_LABEL_MISMATCH"] and what in problems[0].message
    root = _msd(tmp_path / "ds2", [("b", image, np.zeros((6, 6, 5), np.uint8))])
    problems = validate_dataset(root).problems
    assert [p.code for p in problems] == ["IMAGE_LABEL_MISMATCH"] and "shape (6, 6, 6) vs (6, 6, 5)" in problems[0].message


def test_19_unexpected_label_values_and_missing_files_are_listed(tmp_path: Path):
    label = np.zeros((6, 6, 6), np.uint8)
    label[0, 0, 0], label[1, 1, 1] = 3, 7
    root = _msd(tmp_path / "ds", [("a", np.zeros((6, 6, 6), np.int16), label),
                                  ("b", np.zeros((6, 6, 6), np.int16), np.zeros((6, 6, 6), np.uint8))])
    (root / "labelsTr" / "b.nii.gz").unlink()
    report = validate_dataset(root)
    found = {(p.case_id, p.code) for p in report.problems}
    assert found == {("a", "LABEL_VALUES_UNEXPECTED"), ("b", "DATASET_FILES_MISSING")}
    message = next(p.message for p in report.problems if p.case_id == "a")
    assert "[3, 7]" in message
    from medseg.io.dataset import load_dataset

    err = _code(load_dataset, root)
    assert err.code == "DATASET_FILES_MISSING" and "b" in err.message


def test_20_mixed_orientations_are_reoriented_on_load_and_restored_on_save(tmp_path: Path, smoke_model: Path):
    from medseg.inference.predictor import Predictor

    predictor = Predictor.from_model_dir(smoke_model, device="cpu")
    rng = np.random.default_rng(0)
    base = rng.normal(0, 100, (24, 20, 12)).astype(np.float32)
    # spacings chosen so that no voxel centre falls exactly halfway between model-grid voxels (3 x 3 x 6 mm):
    # nearest-neighbour ties could otherwise break differently in mirrored orientations
    ras = Volume(base[None], np.diag([1.4, 1.4, 2.8, 1.0]))
    lps_affine = np.diag([-1.4, -1.4, 2.8, 1.0])
    lps_affine[:3, 3] = [1.4 * 23, 1.4 * 19, 0]
    lps = Volume(base[::-1, ::-1].copy()[None], lps_affine)  # same world content, axes flipped
    a, b = predictor.predict(ras), predictor.predict(lps)
    assert a.same_grid(ras) and b.same_grid(lps)
    assert np.array_equal(a.array[0], b.array[0, ::-1, ::-1])
