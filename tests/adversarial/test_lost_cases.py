"""Class 5: every discovered input that cannot be read is a manifest row (and exit 1), never a case that vanishes:
broken symbolic links, link loops, pipes and unreadable files named like images, and a DICOM folder whose only
series has no geometry."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from dicom_helpers import edit, series

from medseg.io.readers import files_by_id


def test_unreadable_entries_named_like_images_are_failed_rows(tmp_path: Path, cli, smoke_model: Path, case_folder: Path):
    inputs = tmp_path / "in"
    shutil.copytree(case_folder, inputs)
    os.symlink(tmp_path / "elsewhere" / "x.nii.gz", inputs / "dangling.nii.gz")
    os.symlink("loop_b.nii.gz", inputs / "loop_a.nii.gz")
    os.symlink("loop_a.nii.gz", inputs / "loop_b.nii.gz")
    os.mkfifo(inputs / "pipe.nrrd")
    run = cli("predict", "-i", inputs, "-o", tmp_path / "out", "-m", smoke_model, "--no-tta")
    assert run.code == 1, run.err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    rows = {c["case_id"]: (c["status"], c["error_code"]) for c in manifest["cases"]}
    for name in ("dangling", "loop_a", "loop_b", "pipe"):
        assert rows[name] == ("failed", "INPUT_UNREADABLE"), rows
    assert manifest["n_ok"] == len(list(case_folder.iterdir())) and manifest["n_failed"] == 4
    assert f"{manifest['n_ok']} of {len(rows)} case(s) written" in run.out


def test_evaluation_does_not_drop_a_broken_reference(tmp_path: Path, cli, case_folder: Path):
    refs = tmp_path / "refs"
    shutil.copytree(case_folder, refs)
    os.symlink(tmp_path / "nowhere.nii.gz", refs / "ct_999.nii.gz")
    assert "ct_999" in files_by_id(refs)
    run = cli("evaluate", "-p", case_folder, "-r", refs, "-o", tmp_path / "eval")
    assert run.code == 2 and "ct_999" in run.err  # a reference without its prediction is named, not skipped


def test_a_dicom_series_without_geometry_is_one_failed_row(tmp_path: Path, cli, smoke_model: Path):
    _, files = series(tmp_path / "dicom" / "s", shape=(12, 12, 6), affine=np.diag([1.5, 1.5, 3.0, 1.0]))
    for f in files:
        edit(f, ImagePositionPatient=None, ImageOrientationPatient=None)
    run = cli("predict", "-i", tmp_path / "dicom", "-o", tmp_path / "out", "-m", smoke_model)
    assert run.code == 1 and "DICOM_NO_GEOMETRY" in run.err, run.err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(c["status"], c["error_code"]) for c in manifest["cases"]] == [("failed", "DICOM_NO_GEOMETRY")]
    assert "6 image(s)" in manifest["cases"][0]["error"]
