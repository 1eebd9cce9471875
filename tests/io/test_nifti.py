import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medseg.errors import InputError
from medseg.io.nifti import read_nifti, write_nifti
from medseg.io.volume import Volume
from tests.conftest import oblique_affine


@pytest.mark.parametrize(
    "affine",
    [
        oblique_affine((0.7, 0.7, 3.0), 0.0, (1, 1, 1)),
        oblique_affine((0.7, 0.7, 3.0), 0.0, (-1, 1, -1)),
        oblique_affine((0.83, 0.9, 2.5), 17.0, (1, -1, 1)),
    ],
    ids=["axial", "flipped", "oblique-flipped"],
)
def test_round_trip_keeps_geometry_and_voxels(tmp_path: Path, make_volume, affine):
    vol = make_volume(affine=affine)
    path = write_nifti(vol, tmp_path / "x.nii.gz")
    back = read_nifti(path)
    assert back.spatial_shape == vol.spatial_shape
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.meta["nifti_transform"] == "sform"
    # an independent reader agrees on the geometry (sform and qform)
    img = nib.load(str(path))
    np.testing.assert_allclose(img.get_sform(), vol.affine, atol=1e-4)
    np.testing.assert_allclose(img.get_qform(), vol.affine, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    spacing=st.tuples(*[st.floats(0.3, 6.0)] * 3),
    angle=st.floats(-45, 45),
    flips=st.tuples(*[st.sampled_from([-1, 1])] * 3),
)
def test_round_trip_property(tmp_path_factory, spacing, angle, flips):
    affine = oblique_affine(spacing, angle, flips)
    vol = Volume(np.arange(4 * 5 * 3, dtype=np.int16).reshape(1, 4, 5, 3), affine)
    back = read_nifti(write_nifti(vol, tmp_path_factory.mktemp("rt") / "p.nii.gz"))
    np.testing.assert_allclose(back.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(back.array, vol.array)


def test_multichannel_round_trip(tmp_path: Path):
    vol = Volume(np.random.default_rng(0).random((2, 5, 6, 7)).astype(np.float32), np.diag([1.0, 2.0, 3.0, 1.0]))
    back = read_nifti(write_nifti(vol, tmp_path / "mc.nii"))
    assert back.array.shape == (2, 5, 6, 7)
    np.testing.assert_array_equal(back.array, vol.array)


def test_truncated_gzip_is_reported_as_corrupt(tmp_path: Path, make_volume):
    path = write_nifti(make_volume(), tmp_path / "x.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as info:
        read_nifti(path)
    assert info.value.code == "NIFTI_CORRUPT" and "x.nii.gz" in info.value.message


def test_garbage_file_is_reported_as_corrupt(tmp_path: Path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header at all"))
    with pytest.raises(InputError) as info:
        read_nifti(path)
    assert info.value.code == "NIFTI_CORRUPT"


def test_nan_voxels_rejected(tmp_path: Path):
    arr = np.zeros((1, 4, 4, 4), dtype=np.float32)
    arr[0, 1, 1, 1] = np.nan
    path = write_nifti(Volume(arr, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError) as info:
        read_nifti(path)
    assert info.value.code == "NIFTI_NONFINITE"


def test_missing_file(tmp_path: Path):
    with pytest.raises(InputError) as info:
        read_nifti(tmp_path / "nope.nii.gz")
    assert info.value.code == "PATH_NOT_FOUND"


def test_write_leaves_no_partial_files(tmp_path: Path, make_volume):
    write_nifti(make_volume(), tmp_path / "a.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]


def test_gz_writes_are_byte_identical_for_the_same_volume(tmp_path: Path, make_volume):
    volume = make_volume()
    a = write_nifti(volume, tmp_path / "a.nii.gz").read_bytes()
    b = write_nifti(volume, tmp_path / "b.nii.gz").read_bytes()
    assert a == b and a[:2] == b"\x1f\x8b"


def test_gz_layout_is_medsegs_own_whatever_the_compressor(tmp_path: Path, make_volume):
    """The bytes medseg owns, checked without depending on the gzip encoder's version: a gzip member with no file
    name and mtime 0, holding exactly the 348-byte header, a zero extension flag and the voxels in Fortran order."""
    import io
    import struct

    volume = make_volume(shape=(6, 5, 4))
    raw = write_nifti(volume, tmp_path / "a.nii.gz").read_bytes()
    magic, method, flags, mtime = struct.unpack("<2sBBI", raw[:8])
    assert (magic, method, mtime) == (b"\x1f\x8b", 8, 0) and not flags & 0x08  # deflate, no FNAME, no time
    stream = gzip.decompress(raw)
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(stream[:348]))
    assert int(header["sizeof_hdr"]) == 348 and float(header["vox_offset"]) == 352
    assert stream[348:352] == b"\x00" * 4
    assert stream[352:] == volume.array[0].tobytes(order="F")
    assert np.allclose(header.get_sform(), volume.affine, atol=1e-6)


def test_written_files_get_the_usual_permissions(tmp_path: Path, make_volume):
    import os

    umask = os.umask(0)
    os.umask(umask)
    mode = write_nifti(make_volume(), tmp_path / "a.nii.gz").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
def test_write_read_every_dtype_and_memory_order(tmp_path: Path, dtype, order):
    rng = np.random.default_rng(0)
    array = np.asarray(rng.integers(0, 200, (1, 7, 5, 40)), dtype=dtype, order=order)
    volume = Volume(array, np.diag([0.5, 0.7, 1.3, 1.0]))
    back = read_nifti(write_nifti(volume, tmp_path / "v.nii.gz"))
    assert back.array.dtype == dtype and np.array_equal(back.array, array)
