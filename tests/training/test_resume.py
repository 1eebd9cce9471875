"""Exact resume: 4 epochs straight == 2 epochs, SIGKILL, resume to 4. Checkpoints survive interrupted writes."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medseg.errors import OutputError, TrainingError
from medseg.training.checkpoint import load_checkpoint

ARGS = ["-c", "smoke", "--set", "train.iterations_per_epoch=15", "--set", "train.val_every=2",
        "--set", "augment.rotate_prob=0.5", "--set", "augment.noise_prob=0.5"]


#: Bit-identical resume needs the same thread count in both runs (CPU reductions split work by thread), so it is
#: fixed here rather than left to the CPU share, which changes with whatever else runs on the machine.
FIXED_THREADS = {**os.environ, "MEDSEG_THREADS": "2"}


def _medseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "medseg", "-q", *args]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model_last" / "weights.pt", weights_only=True)


def test_sigkill_then_resume_gives_identical_weights(tiny_dataset: Path, tmp_path: Path):
    data = ["--set", f"data.dataset={tiny_dataset}", "--set", "train.epochs=4"]
    straight = subprocess.run(_medseg("train", *ARGS, *data, "-o", str(tmp_path / "straight")), capture_output=True, text=True, timeout=300,
                              env=FIXED_THREADS)
    assert straight.returncode == 0, straight.stderr

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_medseg("train", *ARGS, *data, "-o", str(killed_dir)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=FIXED_THREADS)
    progress = killed_dir / "checkpoints" / "last.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if progress.is_file():
            try:
                if json.loads(progress.read_text())["epoch"] >= 2:
                    break
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL  # really killed, not finished
    killed_at = json.loads(progress.read_text())["epoch"]
    assert 2 <= killed_at < 4 and not (killed_dir / "model_last").exists()

    resumed = subprocess.run(_medseg("train", "--resume", "-o", str(killed_dir)), capture_output=True, text=True, timeout=300,
                             env=FIXED_THREADS)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "straight"), _weights(killed_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((killed_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_resume_can_extend_epochs_and_refuses_other_changes(tiny_dataset: Path, tmp_path: Path):
    run = tmp_path / "run"
    base = _medseg("train", "-c", "smoke", "--set", f"data.dataset={tiny_dataset}", "-o", str(run))
    assert subprocess.run(base, capture_output=True, timeout=300).returncode == 0
    record = json.loads((run / "run.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(record["tracking_uri"])
    finished = client.get_run(record["mlflow_run_id"]).info
    assert finished.status == "FINISHED"
    again = subprocess.run(_medseg("train", "--resume", "-o", str(run)), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "RESUME_NOTHING_TO_DO" in again.stderr
    refused = client.get_run(record["mlflow_run_id"]).info  # a refused resume does not mark the run FAILED
    assert refused.status == "FINISHED" and refused.end_time == finished.end_time
    changed = subprocess.run(_medseg("train", "--resume", "-o", str(run), "--set", "train.lr=0.1"), capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2 and "RESUME_CONFIG_CHANGED" in changed.stderr
    extended = subprocess.run(_medseg("train", "--resume", "-o", str(run), "--set", "train.epochs=3"), capture_output=True, text=True, timeout=300)
    assert extended.returncode == 0, extended.stderr
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1, 2, 3]
    assert client.get_run(record["mlflow_run_id"]).info.status == "FINISHED"  # the extended run ended again
    history = client.get_metric_history(record["mlflow_run_id"], "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # the same MLflow run continued


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path: Path, monkeypatch):
    from medseg.training import checkpoint

    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def dying_save(obj, target):
        Path(target).write_bytes(b"PK\x03\x04 partial")  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OutputError) as info:
        checkpoint.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    assert info.value.code == "DISK_FULL" and "last.pt" in info.value.message
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_unreadable_and_missing_checkpoints(tmp_path: Path):
    with pytest.raises(TrainingError) as info:
        load_checkpoint(tmp_path / "none.pt")
    assert info.value.code == "CHECKPOINT_NOT_FOUND"
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(TrainingError) as info:
        load_checkpoint(tmp_path / "bad.pt")
    assert info.value.code == "CHECKPOINT_UNREADABLE"
