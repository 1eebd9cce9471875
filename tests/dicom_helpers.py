"""Builders of DICOM test inputs (good and deliberately broken series), shared by the I/O tests."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
from scipy.spatial.transform import Rotation

from medseg.io.dicom_write import write_dicom_series
from medseg.io.volume import Volume

CANARY_NAME = "Canary^Zebediah"
CANARY_ID = "PID-CANARY-7731"


def rotated_affine(angles=(10.0, -20.0, 35.0), spacing=(0.7, 0.9, 2.5), origin=(-10.5, 20.25, 33.3)) -> np.ndarray:
    """An oblique, anisotropic voxel-to-RAS affine."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def series(folder: Path, shape=(20, 24, 10), affine=None, seed=0, **kwargs) -> tuple[Volume, list[Path]]:
    """Writes a random int16 CT-like series; returns the volume written and the files."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 2000, (1, *shape)).astype(np.int16)
    volume = Volume(array, rotated_affine() if affine is None else affine)
    kwargs.setdefault("patient_name", CANARY_NAME)
    kwargs.setdefault("patient_id", CANARY_ID)
    return volume, write_dicom_series(volume, folder, **kwargs)


def edit(path: Path, **attributes) -> None:
    """Rewrites one file with changed attributes (``None`` deletes)."""
    ds = pydicom.dcmread(path)
    for key, value in attributes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def tool(name: str) -> str | None:
    """Path of a console tool installed beside this Python (dcm2niix, dciodvfy wheels) or on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def assert_same_world(expected: Volume, actual: Volume, atol_mm: float = 1e-4) -> None:
    """Asserts two volumes hold identical voxels on the same world grid, allowing a different axis order or
    direction (e.g. a DICOM stack sorted along the slice normal, or highdicom's frame-first arrays)."""
    to_expected = np.linalg.inv(expected.affine) @ actual.affine
    perm = np.round(to_expected[:3, :3])
    assert np.abs(np.abs(perm).sum(axis=0) - 1).max() == 0, "axes are not a signed permutation"
    scale = np.linalg.norm(expected.affine[:3, :3], axis=0)
    assert np.abs((to_expected[:3, :3] - perm) * scale[:, None]).max() < atol_mm
    shift = np.round(to_expected[:3, 3])
    assert np.abs((to_expected[:3, 3] - shift) * scale).max() < atol_mm
    index = np.indices(actual.spatial_shape).reshape(3, -1)
    mapped = (perm @ index + shift[:, None]).astype(int)
    assert (mapped >= 0).all() and (mapped < np.array(expected.spatial_shape)[:, None]).all()
    rebuilt = np.zeros_like(expected.array[0])
    rebuilt[tuple(mapped)] = actual.array[0].reshape(-1)
    assert actual.array.size == expected.array.size and np.array_equal(rebuilt, expected.array[0])
