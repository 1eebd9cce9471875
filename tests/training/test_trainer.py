import json
import math
from pathlib import Path

import pytest
import torch

from medseg.config import load_config
from medseg.errors import TrainingError
from medseg.losses import build_loss
from medseg.training.optim import lr_factor
from medseg.training.trainer import fit


def _cfg(tiny_dataset: Path, *overrides: str):
    return load_config("smoke", [f"data.dataset={tiny_dataset}", *overrides])


def test_nonfinite_loss_stops_with_step_and_cases_and_keeps_best(tiny_dataset: Path, tmp_path: Path, monkeypatch):
    cfg = _cfg(tiny_dataset, "train.epochs=3")
    fit(cfg, tmp_path / "ok", show_progress=False)  # a run whose best model exists
    import medseg.training.trainer as trainer

    real = trainer.deep_supervision_loss
    calls = {"n": 0}

    def poisoned(loss_fn, output, label, *rest):
        calls["n"] += 1
        value = real(loss_fn, output, label, *rest)
        return value * float("nan") if calls["n"] == 5 else value

    monkeypatch.setattr(trainer, "deep_supervision_loss", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(TrainingError) as info:
        fit(cfg, run, show_progress=False)
    err = info.value
    assert err.code == "TRAIN_NONFINITE_LOSS" and "epoch 3, step 4" in err.message and "ct_00" in err.message
    best = json.loads((run / "model" / "model.json").read_text())
    assert best["epoch"] in (1, 2)  # the best model from before the failure is intact
    assert json.loads((run / "checkpoints" / "last.json").read_text())["epoch"] == 2


def test_cuda_out_of_memory_names_patch_and_batch(tiny_dataset: Path, tmp_path: Path, monkeypatch):
    import medseg.training.trainer as trainer

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "deep_supervision_loss", oom)
    with pytest.raises(TrainingError) as info:
        fit(_cfg(tiny_dataset), tmp_path / "run", show_progress=False)
    assert info.value.code == "CUDA_OUT_OF_MEMORY"
    assert "patch [16, 16, 8]" in info.value.message and "batch size 2" in info.value.message
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_early_stopping(tiny_dataset: Path, tmp_path: Path):
    result = fit(_cfg(tiny_dataset, "train.epochs=20", "train.early_stopping=2", "train.lr=1e-9"), tmp_path / "r", show_progress=False)
    assert result.stopped_early and len(result.history) < 20


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
def test_schedules_warm_up_then_decay_to_zero(schedule: str):
    cfg = load_config("smoke", [f"train.schedule={schedule}", "train.epochs=10", "train.iterations_per_epoch=10", "train.warmup_epochs=1"])
    f = lr_factor(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    values = [f(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:])) and f(100) == pytest.approx(0.0, abs=1e-9)
    mid = f(55)
    expected = 0.5 * (1 + math.cos(math.pi * 0.5)) if schedule == "cosine" else 0.5**0.9
    assert mid == pytest.approx(expected)


def test_sigmoid_losses_use_sigmoid_in_every_term():
    from monai.losses import DiceLoss, FocalLoss

    cfg = load_config("smoke", ["loss.name=dice_focal", "loss.activation=sigmoid"]).loss
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 6, 6, 4), torch.randint(0, 3, (2, 1, 6, 6, 4)).float()
    combined = build_loss(cfg)(logits, labels)
    dice = DiceLoss(to_onehot_y=True, sigmoid=True)(logits, labels)
    focal = FocalLoss(to_onehot_y=True, use_softmax=False, gamma=cfg.focal_gamma)(logits, labels)
    assert torch.allclose(combined, dice + focal, atol=1e-6)
    ce = build_loss(load_config("smoke", ["loss.name=dice_ce", "loss.activation=sigmoid", "loss.dice_weight=0"]).loss)
    onehot = torch.nn.functional.one_hot(labels[:, 0].long(), 3).movedim(-1, 1).float()
    assert torch.allclose(ce(logits, labels), torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot), atol=1e-6)


def test_run_folder_has_best_and_last_models_and_checkpoint(tiny_dataset: Path, tmp_path: Path):
    result = fit(_cfg(tiny_dataset), tmp_path / "r", show_progress=False)
    run = result.run_dir
    assert (run / "model" / "weights.pt").is_file() and (run / "model_last" / "weights.pt").is_file()
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "best_metric", "history"} <= set(state)
    assert len(state["rng"]) == 1 and len(state["rng"][0]["transforms"]) > 5


def test_optimiser_schedule_and_deep_supervision_knobs_come_from_the_config(tiny_dataset: Path, tmp_path: Path, monkeypatch):
    from medseg.models.contract import deep_supervision_loss

    cfg = load_config("smoke", ["train.schedule=poly", "train.poly_exponent=2", "train.epochs=10",
                                "train.iterations_per_epoch=10", "train.warmup_epochs=0"])
    assert lr_factor(cfg)(50) == pytest.approx(0.5**2)

    outputs = [torch.full((1,), 1.0), torch.full((1,), 2.0), torch.full((1,), 4.0)]  # coarse ... final
    loss = deep_supervision_loss(lambda o, label: o.sum(), outputs, None, decay=0.25)
    assert float(loss) == pytest.approx((0.0625 * 1 + 0.25 * 2 + 1 * 4) / (0.0625 + 0.25 + 1))

    seen = {}
    real = torch.optim.SGD

    def spy(params, **kwargs):
        seen.update(kwargs)
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", spy)
    fit(_cfg(tiny_dataset, "train.optimizer=sgd", "train.momentum=0.9", "train.epochs=1"), tmp_path / "r",
        show_progress=False)
    assert seen["momentum"] == 0.9 and seen["nesterov"] is True
