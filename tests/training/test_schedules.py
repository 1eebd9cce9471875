"""``train.schedule: plateau`` (ReduceLROnPlateau on the validation Dice, exact resume) and ``train.accumulate``
(gradient accumulation: one step of accumulate 2 x batch 1 is one step of batch 2)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor

from medseg.config import load_config
from medseg.losses import build_loss
from medseg.models import build_model
from medseg.training import trainer
from medseg.training.optim import WarmupPlateau, build_optimizer, build_schedule
from medseg.training.trainer import backward_step, fit, optimizer_step


def _cfg(tiny_dataset: Path, *overrides: str):
    return load_config("smoke", [f"data.dataset={tiny_dataset}", *overrides])


def _batch(image: torch.Tensor, label: torch.Tensor) -> dict:
    return {"image": MetaTensor(image), "label": MetaTensor(label), "case_id": ["a"] * image.shape[0]}


def _one_update(net, cfg, batches: list[dict], share: float) -> tuple[dict, dict]:
    """One optimizer step over ``batches`` (gradients summed, each times ``share``): the gradients and weights."""
    optimizer = build_optimizer(net.parameters(), cfg.train)
    schedule = build_schedule(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    optimizer.zero_grad(set_to_none=True)
    for batch in batches:
        backward_step(net, build_loss(cfg.loss), scaler, batch, cfg, torch.device("cpu"), False, torch.float16, share=share)
    grads = {k: p.grad.clone() for k, p in net.named_parameters()}
    optimizer_step(net, optimizer, scaler, schedule, cfg)
    return grads, {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("network, shape", [
    (["model.name=unet"], (16, 16, 8)),
    (["model.name=unetpp", "model.deep_supervision=true", "model.channels=[4, 4, 4, 8, 8]",
      "model.strides=[2, 2, 2, 2]"], (32, 32, 32)),  # deep supervision: a weighted sum of losses, linear too
])
def test_accumulating_two_batches_of_one_equals_one_batch_of_two(network: list[str], shape: tuple[int, ...]):
    # instance norm (no batch statistics), Dice per sample and focal loss as a voxel mean: the loss of a batch of
    # two is the mean of the two losses, so the accumulated gradient must be the batch's gradient. SGD makes the
    # step linear in it (Adam's first step, g / |g|, turns float noise in a zero-gradient bias into +-lr). In float64:
    # in float32 the sums in another order differ by up to 3e-4 relative in UNet++'s first layer (instance norm over
    # 2^3 voxels and leaky-ReLU kinks amplify rounding), which would hide a real difference of that size
    cfg = load_config("smoke", ["loss.name=dice_focal", "train.grad_clip=1.0", "train.optimizer=sgd", *network])
    torch.manual_seed(0)
    net = build_model(cfg.model, 3, 1, 3).double()
    image, label = torch.randn(2, 1, *shape, dtype=torch.float64), torch.randint(0, 3, (2, 1, *shape)).double()
    whole = _batch(image, label)
    halves = [_batch(image[i : i + 1], label[i : i + 1]) for i in range(2)]

    grads_2, weights_2 = _one_update(copy.deepcopy(net), cfg, [whole], 1.0)
    grads_1x2, weights_1x2 = _one_update(copy.deepcopy(net), cfg, halves, 0.5)
    for key in grads_2:
        torch.testing.assert_close(grads_1x2[key], grads_2[key], rtol=1e-9, atol=1e-12)
    for key in weights_2:
        torch.testing.assert_close(weights_1x2[key], weights_2[key], rtol=1e-9, atol=1e-12)
    assert any(not torch.equal(weights_2[k], v) for k, v in net.state_dict().items())  # the step did move the weights
    unshared, _ = _one_update(copy.deepcopy(net), cfg, halves, 1.0)  # the check notices a missing 1/N
    assert all((unshared[k] - grads_2[k]).norm() > 0.5 * grads_2[k].norm() for k in grads_2 if grads_2[k].norm() > 0)


def test_fit_takes_one_optimizer_step_per_accumulated_batches(tiny_dataset: Path, tmp_path: Path, monkeypatch):
    calls = {"backward": 0, "step": 0}
    real_backward, real_step = trainer.backward_step, trainer.optimizer_step

    def counting_backward(*args, **kwargs):
        calls["backward"] += 1
        return real_backward(*args, **kwargs)

    def counting_step(*args, **kwargs):
        calls["step"] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "backward_step", counting_backward)
    monkeypatch.setattr(trainer, "optimizer_step", counting_step)
    cfg = _cfg(tiny_dataset, "train.accumulate=3", "train.epochs=2", "train.iterations_per_epoch=2")
    result = fit(cfg, tmp_path / "run", show_progress=False)
    assert calls == {"backward": 2 * 2 * 3, "step": 2 * 2}
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert all(h["samples_per_s"] > 0 for h in result.history)


@pytest.mark.usefixtures("fixed_threads")
def test_plateau_drops_the_rate_on_the_validation_dice_and_resumes_bit_identically(tiny_dataset: Path, tmp_path: Path):
    overrides = ["train.schedule=plateau", "train.plateau_patience=0", "train.plateau_factor=0.5", "train.val_every=1",
                 "train.warmup_epochs=1", "train.iterations_per_epoch=3", "train.lr=1e-7", "train.optimizer=sgd", "inference.qc.calibrate=false"]
    straight = fit(_cfg(tiny_dataset, *overrides, "train.epochs=4"), tmp_path / "straight", show_progress=False)
    lrs = [h["lr"] for h in straight.history]
    dice = [h["val_dice_mean"] for h in straight.history]
    # each epoch's rate follows ReduceLROnPlateau(mode=max, patience=0, threshold 1e-4 relative) on the Dice of the
    # validations before it (after the one warm-up epoch); SGD at a rate this small keeps the Dice within the threshold
    # (and above ReduceLROnPlateau.eps, 1e-8, below which it ignores a drop)
    expected, best, lr = [1e-7], float("-inf"), 1e-7
    for value in dice[:-1]:
        if value > best * (1 + 1e-4):
            best = value
        else:
            lr *= 0.5
        expected.append(lr)
    assert lrs == pytest.approx(expected, rel=1e-9) and len(set(lrs)) > 1

    first = fit(_cfg(tiny_dataset, *overrides, "train.epochs=2"), tmp_path / "resumed", show_progress=False)
    assert len(first.history) == 2
    resumed = fit(_cfg(tiny_dataset, *overrides, "train.epochs=4"), tmp_path / "resumed", show_progress=False, resume=True)
    assert [h["lr"] for h in resumed.history] == lrs
    a = torch.load(tmp_path / "straight" / "model_last" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model_last" / "weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)["scheduler"]
    assert saved["steps"] == 12 and json.loads(json.dumps(saved["base_lrs"])) == [1e-7]


def test_plateau_state_round_trips():
    cfg = load_config("smoke", ["train.schedule=plateau", "train.warmup_epochs=0", "train.plateau_patience=1"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupPlateau(opt, cfg)
    for value in (0.3, 0.2, 0.2):
        schedule.validated(value)
    again = WarmupPlateau(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg)
    again.load_state_dict(schedule.state_dict())
    assert again.plateau.num_bad_epochs == schedule.plateau.num_bad_epochs == 0 and again.plateau.best == 0.3
    assert opt.param_groups[0]["lr"] == 0.5
