"""torchrun with two CPU processes (gloo): one model folder, one MLflow run, per-rank random states."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_torchrun_two_processes_gloo(tiny_dataset: Path, tmp_path: Path):
    run = tmp_path / "run"
    cmd = [str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun"), "--nproc-per-node", "2", "-m", "medseg",
           "train", "-c", "smoke", "--set", f"data.dataset={tiny_dataset}", "-o", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("model: ") == 1  # only rank 0 reports
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("model")) == ["model", "model_last"]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert len(state["rng"]) == 2  # each rank's random state, for resuming
    assert not torch.equal(state["rng"][0]["sampler"], state["rng"][1]["sampler"])  # ranks draw different batches
    client = MlflowClient(json.loads((run / "run.json").read_text())["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("medseg-smoke").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["world_size"] == "2" and runs[0].info.status == "FINISHED"


def test_torchrun_with_accumulation_plateau_and_tensorboard(tiny_dataset: Path, tmp_path: Path):
    """Two gloo processes, two batches per step (the first under no_sync), the plateau schedule (rank 0's Dice
    broadcast so every rank drops its rate together) and TensorBoard written by rank 0 only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, board = tmp_path / "run", tmp_path / "board"
    cmd = [str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun"), "--nproc-per-node", "2", "-m", "medseg",
           "train", "-c", "smoke", "--set", f"data.dataset={tiny_dataset}", "--set", "train.accumulate=2",
           "--set", "train.schedule=plateau", "--set", "train.plateau_patience=0", "--set", "train.lr=1e-7",
           "--set", "train.optimizer=sgd", "--set", "train.epochs=3", "--tensorboard", str(board), "-o", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((run / "history.json").read_text())
    assert [h["lr"] for h in history] == [1e-7, 1e-7, 5e-8]  # SGD at this rate leaves the Dice: validation 2 drops it
    assert json.loads((run / "checkpoints" / "last.json").read_text())["step"] == 3 * 2  # optimizer steps
    assert len(list(board.glob("events.out.tfevents.*"))) == 1  # rank 0 only
    events = EventAccumulator(str(board))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2, 3]
