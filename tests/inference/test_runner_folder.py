"""Folder runs over mixed NIfTI + DICOM inputs: isolation, resume, shards, DICOM-SEG, extras, provenance."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from dicom_helpers import rotated_affine, series
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from medseg.cli import app
from medseg.errors import OutputError
from medseg.fsutil import sha256_file
from medseg.inference.predictor import Predictor
from medseg.inference.runner import RunOptions, predict_folder
from medseg.io.dicom import read_dicom
from medseg.io.nifti import read_nifti


@pytest.fixture(scope="module")
def predictor(smoke_model: Path) -> Predictor:
    return Predictor.from_model_dir(smoke_model, "cpu")


@pytest.fixture
def mixed(tmp_path: Path, tiny_dataset: Path) -> Path:
    """good.nii.gz, broken.nii.gz (truncated), a good oblique DICOM series, an RT structure set, a README."""
    root = tmp_path / "in"
    root.mkdir()
    shutil.copy(tiny_dataset / "imagesTs" / "ct_003.nii.gz", root / "good.nii.gz")
    (root / "broken.nii.gz").write_bytes((tiny_dataset / "imagesTs" / "ct_003.nii.gz").read_bytes()[:700])
    series(root / "patient_dir" / "ct", shape=(30, 28, 9), affine=rotated_affine(spacing=(1.6, 1.4, 3.5)))
    shutil.copy(get_testdata_file("test-SR.dcm"), root / "patient_dir" / "report.dcm")
    (root / "README.txt").write_text("export notes")
    return root


def test_mixed_folder_finishes_good_cases_and_reports_the_others(predictor, mixed: Path, tmp_path: Path):
    out = tmp_path / "out"
    results = predict_folder(predictor, mixed, out)
    status = {r.case_id: (r.status, r.error_code) for r in results}
    dicom_case = next(k for k in status if k.startswith("series_"))
    report_case = next(k for k in status if k.startswith("file_"))  # named by its path hash, never its file name
    assert status == {
        "broken": ("failed", "NIFTI_CORRUPT"),
        "good": ("ok", None),
        dicom_case: ("ok", None),
        report_case: ("skipped", "DICOM_NOT_IMAGE"),
    }
    assert re.fullmatch(r"file_[0-9a-f]{8}", report_case)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["n_ok"], manifest["n_failed"], manifest["n_skipped"]) == (2, 1, 1)
    assert manifest["ignored_files"] == {"DICOM_NOT_DICOM": 1}
    # predictions reloaded have the input's exact geometry, for the DICOM series too
    source = read_dicom(mixed / "patient_dir" / "ct")
    pred = read_nifti(out / f"{dicom_case}.nii.gz")
    assert pred.spatial_shape == source.spatial_shape and np.abs(pred.affine - source.affine).max() < 1e-4
    inputs = {c["case_id"]: c["input"] for c in manifest["cases"]}  # relative: no absolute path, no DICOM names
    assert inputs == {"broken": "broken.nii.gz", "good": "good.nii.gz", dicom_case: f"DICOM {dicom_case}",
                      report_case: f"DICOM {report_case.replace('_', ' ')}"}
    entry = next(c for c in manifest["cases"] if c["case_id"] == dicom_case)
    assert entry["series_instance_uid"] == source.meta["series_instance_uid"]
    assert set(entry["timings"]) == {"read_s", "predict_s", "write_s"}
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["models"][0]["weights_sha256"] and provenance["settings"]["tta"] is False
    assert any(c["series_instance_uid"] == source.meta["series_instance_uid"] for c in provenance["cases"])


def test_cli_exit_code_and_one_line_per_problem(smoke_model: Path, mixed: Path, tmp_path: Path):
    result = CliRunner().invoke(app, ["predict", "-i", str(mixed), "-o", str(tmp_path / "o"), "-m", str(smoke_model), "-d", "cpu"])
    assert result.exit_code == 1
    assert "2 of 4 case(s) written" in result.output
    assert "failed: broken: NIFTI_CORRUPT" in result.output and re.search(r"skipped: file_[0-9a-f]{8}: DICOM_NOT_IMAGE", result.output)
    assert "report.dcm" not in result.output


def test_resume_skips_complete_cases_and_redoes_a_truncated_output(predictor, tiny_dataset: Path, tmp_path: Path):
    inputs = tmp_path / "in"
    shutil.copytree(tiny_dataset / "imagesTr", inputs)
    out = tmp_path / "out"
    first = predict_folder(predictor, inputs, out)
    assert all(r.status == "ok" for r in first)
    truncated = out / f"{first[0].case_id}.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:100])  # what a killed non-atomic writer would leave
    (out / f"{first[1].case_id}.nii.gz").unlink()
    untouched = out / f"{first[2].case_id}.nii.gz"
    mtime = untouched.stat().st_mtime_ns
    again = predict_folder(predictor, inputs, out, options=RunOptions(resume=True))
    assert [r.resumed for r in again] == [False, False, True]
    assert all(r.status == "ok" for r in again)
    assert sha256_file(truncated) == first[0].sha256 and untouched.stat().st_mtime_ns == mtime
    # without --resume or --overwrite the finished run's folder is refused before anything is touched
    with pytest.raises(OutputError) as info:
        predict_folder(predictor, inputs, out)
    assert info.value.code == "OUTPUT_EXISTS"


def test_shards_split_the_cases(predictor, tiny_dataset: Path, tmp_path: Path):
    inputs = tmp_path / "in"
    shutil.copytree(tiny_dataset / "imagesTr", inputs)
    ids = []
    for i in range(2):
        results = predict_folder(predictor, inputs, tmp_path / "out", options=RunOptions(shard=(i, 2)))
        ids.append([r.case_id for r in results])
        assert (tmp_path / "out" / f"manifest.shard-{i}-of-2.json").is_file()
    assert ids == [["ct_000", "ct_002"], ["ct_001"]]


def test_dicom_seg_output_stats_preview_and_probabilities(predictor, tmp_path: Path):
    import highdicom as hd

    series(tmp_path / "in" / "ct", shape=(30, 28, 9), affine=np.diag([3.0, 3.0, 6.0, 1.0]))
    out = tmp_path / "out"
    options = RunOptions(output_type="dicom-seg", stats=True, preview=True, save_probabilities=True)
    [result] = predict_folder(predictor, tmp_path / "in", out, options=options)
    assert result.status == "ok" and result.output.endswith(".dcm")
    seg = hd.seg.segread(out / result.output)
    assert seg.SegmentationType == "BINARY" and {s.SegmentLabel for s in seg.SegmentSequence} == {"organ", "lesion"}
    probs = np.load(out / "probabilities" / f"{result.case_id}.npz")
    assert probs["probabilities"].dtype == np.float16 and probs["probabilities"].shape == (3, 30, 28, 9)
    assert np.allclose(probs["probabilities"].astype(np.float32).sum(0), 1, atol=5e-3)
    labels = probs["probabilities"].astype(np.float32).argmax(0)
    voxel_ml = 3.0 * 3.0 * 6.0 / 1000
    assert result.volumes_ml["organ"] == pytest.approx(float((labels == 1).sum()) * voxel_ml, rel=0.02, abs=voxel_ml * 3)
    assert (out / "previews" / f"{result.case_id}.png").stat().st_size > 1000
    csv = (out / "stats.csv").read_text().splitlines()
    assert csv[0] == "case_id,organ_ml,lesion_ml,qc,qc_score,qc_reasons" and csv[1].startswith(result.case_id)
    assert csv[1].split(",")[3] == result.qc["verdict"] and float(csv[1].split(",")[4]) == result.qc["score"]
    assert set(result.outputs) == {"labels", "probabilities", "preview", "viewer"}  # viewer: the reports' viewer file


def test_dicom_seg_for_nifti_inputs_writes_nifti_with_a_note(predictor, tiny_dataset: Path, tmp_path: Path):
    options = RunOptions(output_type="dicom-seg")
    [result] = predict_folder(predictor, tiny_dataset / "imagesTs" / "ct_003.nii.gz", tmp_path / "o", options=options)
    assert result.status == "ok" and result.output == "ct_003.nii.gz" and "DICOM-SEG needs a DICOM input" in result.notes[0]


def test_results_are_owned_by_the_main_thread(predictor, tmp_path: Path, monkeypatch, make_volume):
    """Many tiny cases through the overlapped reader and writer: every result field is set by the main thread
    (the writer returns what it measured), and every manifest row matches its output file."""
    import threading

    from medseg.inference import runner
    from medseg.io.nifti import write_nifti

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(24):
        write_nifti(make_volume(shape=(12, 10, 4), affine=np.diag([3.0, 3.0, 6.0, 1.0]), seed=i),
                    inputs / f"c{i:02d}.nii.gz")
    main, setters = threading.get_ident(), set()
    plain = runner.CaseResult.__setattr__

    def recording(self, name, value):
        setters.add(threading.get_ident())
        plain(self, name, value)

    monkeypatch.setattr(runner.CaseResult, "__setattr__", recording)
    results = predict_folder(predictor, inputs, tmp_path / "out", options=RunOptions(progress=False, preview=True))
    assert setters == {main}
    assert [r.status for r in results] == ["ok"] * 24
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["n_ok"] == 24 and manifest["n_pending"] == 0
    for row in manifest["cases"]:
        assert row["sha256"] == sha256_file(tmp_path / "out" / row["output"])
        assert (tmp_path / "out" / row["outputs"]["preview"]["file"]).is_file() and row["timings"]["write_s"] >= 0


def test_predict_dicom_option_sets_the_stack_tolerances(smoke_model: Path, tmp_path: Path):
    """``--dicom KEY=VALUE`` reaches the series loader: a 2-slice series is refused by default (min_slices 3)."""
    series(tmp_path / "in" / "short", shape=(20, 24, 2), affine=rotated_affine())
    runner = CliRunner()
    args = ["predict", "-i", str(tmp_path / "in"), "-m", str(smoke_model), "-d", "cpu"]
    refused = runner.invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert refused.exit_code == 1 and "DICOM_TOO_FEW_SLICES" in refused.output, refused.output
    accepted = runner.invoke(app, [*args, "-o", str(tmp_path / "b"), "--dicom", "min_slices=2"])
    assert accepted.exit_code == 0 and "1 of 1 case(s) written" in accepted.output, accepted.output


def test_nrrd_label_output_keeps_the_input_geometry(predictor, tiny_dataset: Path, tmp_path: Path):
    """One catalogue entry (medseg.inference.formats) gives a new output format end to end: ``-t nrrd`` writes
    ``<case>.nrrd`` whose voxels and geometry equal the NIfTI output's."""
    from medseg.io.sitk_formats import read_sitk

    src = tiny_dataset / "imagesTs" / "ct_003.nii.gz"
    nrrd = predict_folder(predictor, src, tmp_path / "nrrd", options=RunOptions(output_type="nrrd", progress=False))[0]
    assert predict_folder(predictor, src, tmp_path / "nifti", options=RunOptions(progress=False))[0].status == "ok"
    assert nrrd.status == "ok" and nrrd.output == "ct_003.nrrd"
    a, b = read_sitk(tmp_path / "nrrd" / "ct_003.nrrd"), read_nifti(tmp_path / "nifti" / "ct_003.nii.gz")
    assert a.same_grid(b, atol_mm=1e-4) and np.array_equal(a.array, b.array)
    assert np.asarray(a.array).dtype == np.uint8


@pytest.mark.parametrize("env,expected", [
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}, (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}, (0, 3)),  # --array=1-3
    ({"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10",
      "SLURM_ARRAY_TASK_STEP": "2"}, (2, 4)),  # --array=10-16:2
    ({"JOB_COMPLETION_INDEX": "5", "MEDSEG_SHARD_COUNT": "8"}, (5, 8)),
])
def test_shard_auto_reads_the_scheduler(env: dict, expected: tuple, monkeypatch):
    from medseg.inference.discovery import KUBERNETES_VARS, SLURM_VARS, parse_shard

    for name in (*SLURM_VARS, *KUBERNETES_VARS):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert parse_shard("auto") == expected


@pytest.mark.parametrize("env", [
    {},  # no scheduler: every worker would take every case
    {"JOB_COMPLETION_INDEX": "1"},  # Kubernetes gives no count
    {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0"},  # index out of range
    {"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10",
     "SLURM_ARRAY_TASK_STEP": "2"},  # off the step
    {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"},
])
def test_shard_auto_refusals(env: dict, monkeypatch):
    from medseg.errors import InputError
    from medseg.inference.discovery import KUBERNETES_VARS, SLURM_VARS, parse_shard

    for name in (*SLURM_VARS, *KUBERNETES_VARS):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError) as info:
        parse_shard("auto")
    assert info.value.code == "SHARD_INVALID"


def test_shard_auto_workers_split_the_folder_and_resume(smoke_model: Path, tiny_dataset: Path, tmp_path: Path,
                                                        monkeypatch):
    """Two Slurm array tasks (--array=1-2) run `medseg predict --shard auto` into one folder: together they predict
    every case once; a task run again with --resume skips its finished cases."""
    from medseg.inference.discovery import KUBERNETES_VARS, SLURM_VARS

    for name in (*SLURM_VARS, *KUBERNETES_VARS):
        monkeypatch.delenv(name, raising=False)
    inputs, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(tiny_dataset / "imagesTr", inputs)
    args = ["-q", "predict", "-i", str(inputs), "-o", str(out), "-m", str(smoke_model), "--shard", "auto", "--no-qc"]
    done = {}
    for task in (1, 2):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
        result = CliRunner().invoke(app, [*args, "--resume"] if task == 1 else args)  # --resume on a fresh folder too
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / f"manifest.shard-{task - 1}-of-2.json").read_text())
        done[task] = sorted(c["case_id"] for c in manifest["cases"] if c["status"] == "ok")
    assert done == {1: ["ct_000", "ct_002"], 2: ["ct_001"]}
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["ct_000.nii.gz", "ct_001.nii.gz", "ct_002.nii.gz"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    stamp = (out / "ct_000.nii.gz").stat().st_mtime_ns
    again = CliRunner().invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    manifest = json.loads((out / "manifest.shard-0-of-2.json").read_text())
    assert sorted(c["case_id"] for c in manifest["cases"]) == ["ct_000", "ct_002"]
    assert (out / "ct_000.nii.gz").stat().st_mtime_ns == stamp  # finished cases were not predicted again
