"""The CLI as a user sees it: real subprocesses, one-line errors, exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest

import medseg


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {code}:"), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_version_and_help():
    assert run("--version").stdout.strip() == f"medseg {medseg.__version__}"
    for args in (["-h"], ["train", "-h"], ["predict", "-h"], ["demo", "-h"]):
        proc = run(*args)
        assert proc.returncode == 0 and "Usage" in proc.stdout


def test_unknown_config_key(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epoch: 3\n")
    proc = run("train", "-c", str(cfg), "-o", str(tmp_path / "run"))
    assert_one_line_error(proc, "CONFIG_UNKNOWN_KEY")
    assert "did you mean 'train.epochs'" in proc.stderr


def test_malformed_yaml(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {epochs: 3\n")
    assert_one_line_error(run("train", "-c", str(cfg), "-o", str(tmp_path / "run")), "CONFIG_YAML_INVALID")


def test_wrong_config_path(tmp_path: Path):
    assert_one_line_error(run("train", "-c", str(tmp_path / "missing.yaml")), "PATH_NOT_FOUND")


def test_wrong_dataset_path(tmp_path: Path):
    proc = run("train", "-c", "smoke", "--set", f"data.dataset={tmp_path / 'nowhere'}", "-o", str(tmp_path / "run"))
    assert_one_line_error(proc, "PATH_NOT_FOUND")


def test_wrong_input_path(tmp_path: Path, smoke_model: Path):
    proc = run("predict", "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "-m", str(smoke_model))
    assert_one_line_error(proc, "PATH_NOT_FOUND")


def test_missing_model_folder(tmp_path: Path, tiny_dataset: Path):
    proc = run("predict", "-i", str(tiny_dataset / "imagesTs"), "-o", str(tmp_path / "o"), "-m", str(tmp_path / "model"))
    assert_one_line_error(proc, "MODEL_NOT_FOUND")


def test_bad_override(tmp_path: Path):
    assert_one_line_error(run("train", "-c", "smoke", "--set", "train.epochs"), "CONFIG_BAD_OVERRIDE")


def test_predict_exit_code_reflects_failed_cases(tmp_path: Path, tiny_dataset: Path, smoke_model: Path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "good.nii.gz").write_bytes((tiny_dataset / "imagesTs" / "ct_003.nii.gz").read_bytes())
    (inputs / "bad.nii.gz").write_bytes(b"\x1f\x8b garbage")
    proc = run("predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(smoke_model), "-d", "cpu")
    assert proc.returncode == 1
    assert "1 of 2 case(s) written" in proc.stdout
    assert "failed: bad: NIFTI_CORRUPT" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "out" / "good.nii.gz").is_file()


def test_sample_data_command(tmp_path: Path):
    proc = run("sample-data", "-o", str(tmp_path), "-n", "2")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ct3d" / "dataset.json").is_file() and (tmp_path / "derm2d" / "dataset.json").is_file()


def test_evaluate_and_report_commands(tmp_path: Path, tiny_dataset: Path, smoke_model: Path):
    pred = tmp_path / "pred"
    assert run("predict", "-i", str(tiny_dataset / "imagesTs"), "-o", str(pred), "-m", str(smoke_model)).returncode == 0
    proc = run(
        "evaluate", "--pred", str(pred), "--ref", str(tiny_dataset / "labelsTs"), "-o", str(tmp_path / "ev"),
        "--images", str(tiny_dataset / "imagesTs"), "--dataset", str(tiny_dataset), "--window", "-160", "240",
    )
    assert proc.returncode == 0, proc.stderr
    assert "organ: mean Dice" in proc.stdout and (tmp_path / "ev" / "metrics.csv").is_file()
    proc = run("report", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stderr
    html = (tmp_path / "ev" / "report.html").read_text()
    assert "window [-160, 240]" in html and "ct_003" in html


def test_evaluate_grid_mismatch_is_one_line(tmp_path: Path, tiny_dataset: Path):
    import shutil

    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(tiny_dataset / "labelsTr" / "ct_000.nii.gz", pred / "ct_003.nii.gz")  # another case's grid
    proc = run("evaluate", "--pred", str(pred), "--ref", str(tiny_dataset / "labelsTs"), "-o", str(tmp_path / "ev"))
    assert_one_line_error(proc, "GRID_MISMATCH")
    assert "ct_003" in proc.stderr


def test_report_of_missing_evaluation(tmp_path: Path):
    assert_one_line_error(run("report", str(tmp_path)), "EVAL_DIR_INVALID")


def test_plan_command(tmp_path: Path, tiny_dataset: Path):
    import json

    proc = run("plan", str(tiny_dataset), "-o", str(tmp_path / "plan.json"))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["dims"] == 3 and plan["normalization"] == ["ct"] and len(plan["spacing"]) == 3
    assert (tmp_path / "plan.fingerprint.json").is_file() and "target spacing" in proc.stdout


def test_internal_errors_are_one_line(tmp_path: Path, monkeypatch, capsys):
    import medseg.sample_data
    from medseg.cli import main

    def boom(*args, **kwargs):
        raise RuntimeError("something unexpected\nsecond line")

    monkeypatch.setattr(medseg.sample_data, "write_sample_data", boom)
    monkeypatch.setattr(sys, "argv", ["medseg", "sample-data", "-o", str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 3 and len(err) == 1
    assert err[0].startswith("error: INTERNAL_ERROR: RuntimeError: something unexpected (hint: rerun with MEDSEG_DEBUG=1")
    monkeypatch.setenv("MEDSEG_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main()


def test_evaluate_logs_to_the_active_mlflow_run(tmp_path: Path, tiny_dataset: Path, smoke_model: Path):
    import os

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("eval", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    client.log_param(run_id, "train.lr", "0.01")
    client.set_terminated(run_id, "FINISHED")  # a training run that ended
    before = client.get_run(run_id).info
    pred = tmp_path / "pred"
    assert run("predict", "-i", str(tiny_dataset / "imagesTs"), "-o", str(pred), "-m", str(smoke_model)).returncode == 0
    env = {**os.environ, "MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([sys.executable, "-m", "medseg", "evaluate", "--pred", str(pred), "--ref", str(tiny_dataset / "labelsTs"),
                           "-o", str(tmp_path / "ev"), "-m", str(smoke_model)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    metrics = client.get_run(run_id).data.metrics
    assert "eval_dice_organ" in metrics and "eval_hd95_organ" in metrics
    assert "metrics.csv" in {Path(a.path).name for a in client.list_artifacts(run_id, "evaluation")}
    after = client.get_run(run_id)  # attaching results leaves the run as it was: status, end time, params
    assert after.info.status == "FINISHED" == before.status and after.info.end_time == before.end_time
    assert after.data.params == {"train.lr": "0.01"}
