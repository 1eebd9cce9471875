"""medseg.lightning: the smoke preset trained by Lightning's Trainer gives the numbers of medseg train (one seed),
a model folder medseg predict runs, metrics in a Lightning logger, and a checkpoint that continues the run."""

import csv
import json
import sys
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.inference.predictor import Predictor
from medseg.io.readers import read_volume
from medseg.lightning import from_config, trainer_arguments
from medseg.training.trainer import fit


def _cfg(tiny_dataset: Path, *extra: str):
    return load_config("smoke", [f"data.dataset={tiny_dataset}", "train.epochs=3", "train.iterations_per_epoch=3",
                                 "augment.rotate_prob=0.5", "augment.noise_prob=0.5", *extra])


def _lightning(cfg, run: Path, **kwargs) -> tuple:
    module, data = from_config(cfg, run)
    trainer = L.Trainer(**trainer_arguments(cfg), logger=CSVLogger(str(run / "lightning_logs")),
                        enable_progress_bar=False, enable_model_summary=False, **kwargs)
    trainer.fit(module, datamodule=data)
    return module, trainer


@pytest.mark.usefixtures("fixed_threads")
def test_lightning_trains_the_numbers_of_medseg_train(tiny_dataset: Path, tmp_path: Path):
    cfg = _cfg(tiny_dataset, "train.accumulate=2", "train.schedule=plateau", "train.plateau_patience=0")
    plain = fit(cfg, tmp_path / "plain", show_progress=False)
    module, _ = _lightning(cfg, tmp_path / "lit", enable_checkpointing=False)

    ours = json.loads((tmp_path / "plain" / "history.json").read_text())
    theirs = json.loads((tmp_path / "lit" / "history.json").read_text())
    assert [h["epoch"] for h in theirs] == [1, 2, 3]
    for key in ("train_loss", "lr", "val_dice_mean"):
        assert [h[key] for h in theirs] == [h[key] for h in ours], key
    a = torch.load(tmp_path / "plain" / "model_last" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "lit" / "model_last" / "weights.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    assert module.model_dir == tmp_path / "lit" / "model" and plain.best_epoch == module.state.best_epoch

    image = read_volume(sorted((tiny_dataset / "imagesTs").iterdir())[0])
    labels = [Predictor.from_model_dir(folder, "cpu").predict(image).array
              for folder in (tmp_path / "plain" / "model_last", tmp_path / "lit" / "model_last")]
    assert np.array_equal(labels[0], labels[1])  # medseg predict runs the Lightning model folder alike

    rows = list(csv.DictReader(open(next((tmp_path / "lit" / "lightning_logs").rglob("metrics.csv")))))
    logged = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    np.testing.assert_allclose(logged, [h["train_loss"] for h in ours], rtol=1e-6)  # Lightning's logger got them
    assert any(r.get("val_dice_mean") for r in rows)


def test_lightnings_mlflow_and_tensorboard_loggers_and_a_user_callback(tiny_dataset: Path, tmp_path: Path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tiny_dataset)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_logger = MLFlowLogger(experiment_name="lightning", tracking_uri=uri)
    board = TensorBoardLogger(str(tmp_path / "tb"), name="run")
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_dice_mean", mode="max", save_top_k=1)
    module, data = from_config(cfg, tmp_path / "run")
    L.Trainer(**trainer_arguments(cfg), logger=[mlflow_logger, board], callbacks=[best], enable_progress_bar=False,
              enable_model_summary=False).fit(module, datamodule=data)
    history = module.state.history
    metrics = MlflowClient(uri).get_metric_history(mlflow_logger.run_id, "train_loss")
    assert [m.value for m in sorted(metrics, key=lambda m: m.step)] == pytest.approx([h["train_loss"] for h in history])
    assert MlflowClient(uri).get_run(mlflow_logger.run_id).data.params["train.epochs"] == "3"  # the config as params
    events = EventAccumulator(board.log_dir)
    events.Reload()
    assert [e.value for e in events.Scalars("val_dice_mean")] == pytest.approx([h["val_dice_mean"] for h in history])
    assert best.best_model_path and Path(best.best_model_path).is_file()  # the user's callback saw the metric
    assert float(best.best_model_score) == pytest.approx(max(h["val_dice_mean"] for h in history))


@pytest.mark.usefixtures("fixed_threads")
def test_a_lightning_checkpoint_continues_the_run(tiny_dataset: Path, tmp_path: Path):
    cfg = _cfg(tiny_dataset, "train.schedule=plateau")  # a schedule that does not depend on train.epochs
    straight, _ = _lightning(cfg, tmp_path / "straight", enable_checkpointing=False)
    two = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2})})
    _, trainer = _lightning(two, tmp_path / "first", enable_checkpointing=False)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    module, data = from_config(cfg, tmp_path / "resumed")
    L.Trainer(**trainer_arguments(cfg), logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False).fit(module, datamodule=data, ckpt_path=tmp_path / "two.ckpt")
    assert [h["epoch"] for h in module.state.history] == [1, 2, 3]
    for key in ("train_loss", "lr"):
        assert [h[key] for h in module.state.history] == [h[key] for h in straight.state.history], key
    a = torch.load(tmp_path / "straight" / "model_last" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model_last" / "weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_lightning_is_refused_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.delitem(sys.modules, "medseg.lightning", raising=False)
    with pytest.raises(ConfigError) as info:
        import medseg.lightning  # noqa: F401
    assert info.value.code == "EXTRA_MISSING" and "medseg[lightning]" in (info.value.hint or "")
