"""Property test: read -> write -> read keeps the affine (<= 1e-4 mm) and the voxels, for NIfTI, NRRD, MHA and
DICOM series, over random oblique, flipped and anisotropic geometries."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from dicom_helpers import assert_same_world
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from medseg.io.dicom import read_dicom
from medseg.io.dicom_write import write_dicom_series
from medseg.io.nifti import read_nifti, write_nifti
from medseg.io.sitk_formats import read_sitk, write_sitk
from medseg.io.volume import Volume


@st.composite
def volumes(draw, min_z: int = 1) -> Volume:
    angles = draw(st.tuples(*[st.floats(-180, 180, allow_nan=False)] * 3))
    flips = draw(st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3))
    spacing = draw(st.tuples(*[st.floats(0.2, 6.0, allow_nan=False)] * 3))
    origin = draw(st.tuples(*[st.floats(-300, 300, allow_nan=False)] * 3))
    shape = draw(st.tuples(st.integers(2, 7), st.integers(2, 7), st.integers(min_z, 6)))
    seed = draw(st.integers(0, 2**16))
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(flips) @ np.diag(spacing)
    affine[:3, 3] = origin
    array = np.random.default_rng(seed).integers(-3000, 3000, (1, *shape)).astype(np.int16)
    return Volume(array, affine)


def _roundtrip(volume: Volume, write, read, name: str) -> Volume:
    with tempfile.TemporaryDirectory() as tmp:
        first = read(write(volume, Path(tmp) / name))
        second = read(write(first, Path(tmp) / ("again_" + name)))
    assert np.abs(second.affine - first.affine).max() <= 1e-4
    assert np.array_equal(second.array, first.array)
    return first


@settings(max_examples=25, deadline=None)
@given(volumes())
def test_nifti_roundtrip(volume: Volume):
    first = _roundtrip(volume, write_nifti, read_nifti, "v.nii.gz")
    assert np.abs(first.affine - volume.affine).max() <= 1e-4
    assert np.array_equal(first.array, volume.array)


@settings(max_examples=25, deadline=None)
@given(volumes(), st.sampled_from(["v.nrrd", "v.mha"]))
def test_nrrd_and_metaimage_roundtrip(volume: Volume, name: str):
    first = _roundtrip(volume, write_sitk, read_sitk, name)
    assert np.abs(first.affine - volume.affine).max() <= 1e-4
    assert np.array_equal(first.array, volume.array)


@settings(max_examples=20, deadline=None)
@given(volumes(min_z=3))
def test_dicom_series_roundtrip(volume: Volume):
    def write(v: Volume, folder: Path) -> Path:
        write_dicom_series(v, folder)
        return folder

    first = _roundtrip(volume, write, read_dicom, "series")
    # the reader sorts slices along the slice normal: a left-handed input comes back with Z reversed
    assert_same_world(volume, first)
