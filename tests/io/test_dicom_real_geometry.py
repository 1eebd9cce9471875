"""Real-scanner slice geometry: positions rounded as DS strings and jittered by +-0.05 mm, slice steps varied by
+-1.5 % are accepted (and match dcm2niix); a 2 degree tilt and a missing slice are still refused."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_helpers import rotated_affine, series, tool

from medseg.errors import InputError
from medseg.io.convert import convert
from medseg.io.dicom import read_dicom
from medseg.io.dicom_geometry import default_tolerances, stack_geometry

STEP_MM = 5.0
GE_MR_LIKE = rotated_affine(angles=(12.0, -7.0, 4.0), spacing=(0.8, 0.8, STEP_MM), origin=(-95.2, -110.7, 40.3))


def _scanner_positions(files: list[Path], seed: int, jitter_mm: float = 0.05, step_spread: float = 0.015,
                       tilt_deg: float = 0.0) -> None:
    """Rewrites ImagePositionPatient as a scanner would: steps varied, every component jittered, DS-rounded to
    0.01 mm; ``tilt_deg`` adds a real shear along the row direction."""
    rng = np.random.default_rng(seed)
    first = pydicom.dcmread(files[0])
    origin = np.array([float(v) for v in first.ImagePositionPatient])
    row, col = (np.array([float(v) for v in first.ImageOrientationPatient[i:i + 3]]) for i in (0, 3))
    normal = np.cross(row, col)
    steps = STEP_MM * (1 + rng.uniform(-step_spread, step_spread, len(files)))
    steps[0] = 0.0
    along = np.cumsum(steps)
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        position = origin + normal * along[k] + rng.uniform(-jitter_mm, jitter_mm, 3)
        position += col * along[k] * np.tan(np.radians(tilt_deg))
        ds.ImagePositionPatient = [f"{v:.2f}" for v in position]
        ds.save_as(path)


def _dcm2niix(folder: Path, out: Path, name: str) -> nib.Nifti1Image:
    out.mkdir(exist_ok=True)
    subprocess.run([tool("dcm2niix"), "-z", "y", "-f", name, "-o", str(out), str(folder)], check=True,
                   capture_output=True)
    return nib.as_closest_canonical(nib.load(out / f"{name}.nii.gz"))


@pytest.mark.skipif(tool("dcm2niix") is None, reason="dcm2niix wheel not installed")
def test_two_real_looking_series_convert_like_dcm2niix(tmp_path: Path):
    root = tmp_path / "export"
    written = {}
    for i, affine in enumerate([GE_MR_LIKE, np.diag([-0.7, 0.7, 2.5, 1.0])]):
        volume, files = series(root / f"s{i}", shape=(32, 28, 20), affine=affine, seed=i, modality="MR",
                               series_number=i + 1)
        _scanner_positions(files, seed=10 + i)
        written[i] = volume
    report = convert(root, tmp_path / "nifti")
    assert report.ok and [r.status for r in report.results] == ["ok", "ok"]
    for i in range(2):
        theirs = _dcm2niix(root / f"s{i}", tmp_path / "ref", f"ref{i}")
        voxels = np.asarray(theirs.dataobj)
        matches = []
        for result in report.results:
            mine = nib.as_closest_canonical(nib.load(result.output))
            if mine.shape == theirs.shape and np.array_equal(np.asarray(mine.dataobj), voxels):
                matches.append((mine, result))
        assert len(matches) == 1, f"series {i}: no output with dcm2niix's voxels"
        mine, result = matches[0]
        assert np.abs(mine.affine - theirs.affine).max() < 0.1  # within 0.1 mm (and 0.1 in direction terms)
        geometry = result.slice_geometry
        assert 0 < geometry["inplane_drift_mm"] < 0.2 and geometry["inplane_drift_px"] <= default_tolerances().drift_px
        assert 0.5 < geometry["step_spread_pct"] < 5 and any("drift" in n for n in result.notes)


def test_real_tilt_and_a_missing_slice_are_still_refused(tmp_path: Path):
    _, files = series(tmp_path / "tilted", shape=(24, 24, 20), affine=GE_MR_LIKE)
    _scanner_positions(files, seed=1, tilt_deg=2.0)
    with pytest.raises(InputError) as err:
        read_dicom(tmp_path / "tilted")
    assert err.value.code == "DICOM_GANTRY_TILT"
    angle = float(re.search(r"gantry tilt about ([0-9.]+) degrees", err.value.message)[1])
    assert angle == pytest.approx(2.0, abs=0.1)

    _, files = series(tmp_path / "gap", shape=(24, 24, 20), affine=GE_MR_LIKE)
    _scanner_positions(files, seed=2)
    files[9].unlink()
    with pytest.raises(InputError) as err:
        read_dicom(tmp_path / "gap")
    assert err.value.code == "DICOM_SLICE_GAP"


def _stack(n: int, step: float, drift: np.ndarray | None = None, steps: np.ndarray | None = None):
    along = np.concatenate([[0.0], np.cumsum(steps if steps is not None else np.full(n - 1, step))])
    positions = np.stack([np.zeros(n), np.zeros(n), along], axis=1)
    if drift is not None:
        positions[:, 0] += drift
    return positions, np.tile([1.0, 0, 0, 0, 1.0, 0], (n, 1))


def test_drift_tolerance_is_a_quarter_pixel():
    n, pixel = 10, (0.5, 0.5)
    below = _stack(n, 3.0, drift=np.r_[0.0, np.full(n - 1, 0.24 * 0.5)])
    g = stack_geometry(*below, pixel, what="s")
    assert g.shift_per_slice is None and g.drift_px == pytest.approx(0.24)
    above = _stack(n, 3.0, drift=np.r_[0.0, np.full(n - 1, 0.26 * 0.5)])
    with pytest.raises(InputError) as err:
        stack_geometry(*above, pixel, what="s")
    assert err.value.code == "DICOM_GANTRY_TILT" and "0.26 pixel" in err.value.message


def test_step_tolerance_thin_and_thick_slices():
    # 0.6 mm slices jittered by 0.09 mm (15 %): within the 0.1 mm floor
    thin = _stack(6, 0.6, steps=np.array([0.6, 0.69, 0.51, 0.6, 0.6]))
    assert stack_geometry(*thin, (0.5, 0.5), what="s").step_spread == pytest.approx(0.15)
    # 5 mm slices: 5 % of the step is the limit
    with pytest.raises(InputError) as err:
        stack_geometry(*_stack(6, 5.0, steps=np.array([5.0, 5.3, 5.0, 5.0, 5.0])), (0.5, 0.5), what="s")
    assert err.value.code == "DICOM_SLICE_GAP"
    # 0.15 mm micro-CT slices: a missing slice is refused although it is only 0.15 mm
    with pytest.raises(InputError):
        stack_geometry(*_stack(6, 0.15, steps=np.array([0.15, 0.15, 0.3, 0.15, 0.15])), (0.05, 0.05), what="s")


def test_tolerances_are_settings_whose_defaults_are_the_config():
    import dataclasses

    import yaml

    from medseg.config import dicom_settings
    from medseg.errors import ConfigError
    from medseg.io.dicom_geometry import DicomTolerances

    # the defaults have one home: base.yaml's inference.dicom, read as YAML here (the dataclass declares none)
    base = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "base.yaml").read_text())
    assert dataclasses.asdict(default_tolerances()) == base["inference"]["dicom"]
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(DicomTolerances))
    above = _stack(10, 3.0, drift=np.r_[0.0, np.full(9, 0.26 * 0.5)])
    with pytest.raises(InputError):
        stack_geometry(*above, (0.5, 0.5), what="s")
    wider = dataclasses.replace(default_tolerances(), drift_px=0.3)
    assert stack_geometry(*above, (0.5, 0.5), what="s", tolerances=wider).drift_px == pytest.approx(0.26)
    uneven = _stack(6, 5.0, steps=np.array([5.0, 5.3, 5.0, 5.0, 5.0]))
    stack_geometry(*uneven, (0.5, 0.5), what="s", tolerances=dataclasses.replace(default_tolerances(), step_relative=0.1))
    with pytest.raises(InputError) as err:
        stack_geometry(*_stack(4, 3.0), (0.5, 0.5), what="s", tolerances=dataclasses.replace(default_tolerances(), min_slices=5))
    assert err.value.code == "DICOM_TOO_FEW_SLICES"
    assert dicom_settings(None, ["drift_px=0.5", "min_slices=2"]).drift_px == 0.5
    for bad, code in (("drift_px=-1", "CONFIG_INVALID_VALUE"), ("drift=0.5", "CONFIG_UNKNOWN_KEY"),
                      ("step_relative=0.6", "CONFIG_INVALID_VALUE"), ("0.5", "CONFIG_BAD_OVERRIDE")):
        with pytest.raises(ConfigError) as cfg_err:
            dicom_settings(None, [bad])
        assert cfg_err.value.code == code, bad


def test_convert_dicom_option_widens_the_drift_tolerance(tmp_path: Path):
    from typer.testing import CliRunner

    from medseg.cli import app

    _, files = series(tmp_path / "in", shape=(24, 24, 20), affine=GE_MR_LIKE)
    _scanner_positions(files, seed=1, tilt_deg=2.0)  # about 0.17 mm per slice: 3.3 mm over the stack
    runner = CliRunner()
    refused = runner.invoke(app, ["convert", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "a.nii.gz")])
    assert refused.exit_code == 1 and "DICOM_GANTRY_TILT" in refused.output
    accepted = runner.invoke(app, ["convert", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "b.nii.gz"),
                                   "--dicom", "drift_px=10"])
    assert accepted.exit_code == 0, accepted.output
    assert (tmp_path / "b.nii.gz").is_file() and not (tmp_path / "a.nii.gz").exists()
    bad = runner.invoke(app, ["convert", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "c.nii.gz"), "--dicom", "tilt=1"])
    assert bad.exit_code != 0 and getattr(bad.exception, "code", None) == "CONFIG_UNKNOWN_KEY"


def test_one_size_cap_for_every_reader(tmp_path: Path, monkeypatch):
    import inspect

    from PIL import Image

    from medseg.io import dicom, image2d, nifti, sitk_formats, volume
    from medseg.io.image2d import read_image2d

    for fn in (nifti.read_nifti, sitk_formats.read_sitk, dicom.load_series):
        assert inspect.signature(fn).parameters["max_bytes"].default is volume.MAX_VOLUME_BYTES
    Image.new("L", (64, 64)).save(tmp_path / "a.png")
    monkeypatch.setattr(image2d, "MAX_VOLUME_BYTES", 64 * 64 - 1)
    with pytest.raises(InputError) as err:
        read_image2d(tmp_path / "a.png")
    assert err.value.code == "IMAGE_TOO_LARGE"
    monkeypatch.setattr(image2d, "MAX_VOLUME_BYTES", 64 * 64)
    assert read_image2d(tmp_path / "a.png").array.shape == (1, 64, 64)
