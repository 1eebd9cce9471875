"""TensorBoard beside MLflow: event files read back with TensorBoard's own reader (EventAccumulator)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the test extra has it

from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.tracking import TensorBoardTracker
from medseg.training.tracker import NullTracker, Trackers
from medseg.training.trainer import fit


def _events(folder: Path) -> EventAccumulator:
    reader = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    reader.Reload()
    return reader


@pytest.mark.usefixtures("fixed_threads")
def test_training_writes_mlflows_scalars_overlays_and_the_graph(tiny_dataset: Path, tmp_path: Path):
    cfg = load_config("smoke", [f"data.dataset={tiny_dataset}", "inference.qc.calibrate=false"])
    board = TensorBoardTracker(tmp_path / "tb")
    tracker = Trackers(NullTracker(), board)
    result = fit(cfg, tmp_path / "run", tracker, show_progress=False)
    tracker.close()
    events = _events(tmp_path / "tb")
    scalars = set(events.Tags()["scalars"])
    assert {"train_loss", "lr", "epoch_time_s", "samples_per_s", "val_dice_mean", "val_dice_organ",
            "val_dice_lesion"} <= scalars, scalars
    for record in result.history:  # the values MLflow gets, at the same step (the epoch)
        for key in ("train_loss", "lr", "val_dice_mean"):
            logged = {e.step: e.value for e in events.Scalars(key)}
            assert logged[record["epoch"]] == pytest.approx(record[key], rel=1e-6)
    images = events.Tags()["images"]
    assert len(images) == 1 and images[0].startswith("validation/")
    shots = events.Images(images[0])
    assert [s.step for s in shots] == [1, 2] and shots[0].width > 100 and shots[0].encoded_image_string[:4] == b"\x89PNG"
    graph = events.Graph()
    assert len(graph.node) > 10 and any("conv" in n.op.lower() or "conv" in n.name.lower() for n in graph.node)
    assert "params/text_summary" in events.Tags()["tensors"]  # the parameter table

    plain = fit(cfg, tmp_path / "plain", show_progress=False)  # the graph trace draws no random numbers
    assert [h["train_loss"] for h in plain.history] == [h["train_loss"] for h in result.history]
    a = torch.load(tmp_path / "run" / "model_last" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "plain" / "model_last" / "weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_flag_beside_mlflow_and_resume_without_doubled_steps(tiny_dataset: Path, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    run, board = tmp_path / "run", tmp_path / "board"
    base = [sys.executable, "-m", "medseg", "-q", "train"]
    first = subprocess.run([*base, "-c", "smoke", "--set", f"data.dataset={tiny_dataset}", "-o", str(run),
                            "--tensorboard", str(board)], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    more = subprocess.run([*base, "--resume", "-o", str(run), "--set", "train.epochs=3"], capture_output=True,
                          text=True, timeout=300)
    assert more.returncode == 0, more.stderr
    events = _events(board)
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2, 3]  # the resumed run appended to the same folder
    import json

    record = json.loads((run / "run.json").read_text())
    mlflow = MlflowClient(record["tracking_uri"]).get_metric_history(record["mlflow_run_id"], "train_loss")
    assert sorted(m.step for m in mlflow) == [1, 2, 3]
    assert [m.value for m in sorted(mlflow, key=lambda m: m.step)] == pytest.approx(
        [e.value for e in events.Scalars("train_loss")], rel=1e-6)  # float32 in the event file
    saved = (run / "config.yaml").read_text()
    assert "tensorboard: true" in saved


def test_missing_tensorboard_is_refused_naming_the_extra(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(ConfigError) as info:
        TensorBoardTracker(tmp_path / "tb")
    assert info.value.code == "EXTRA_MISSING" and "medseg[tensorboard]" in (info.value.hint or "")
    assert not (tmp_path / "tb").exists()
