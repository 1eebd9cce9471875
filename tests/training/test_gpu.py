"""CUDA paths (deselected by default; run with `pytest -m gpu` on a machine with an NVIDIA GPU)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.config import load_config
from medseg.inference.predictor import Predictor
from medseg.io.readers import read_volume
from medseg.training.trainer import fit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_amp_training_step_and_device_prediction(tiny_dataset: Path, tmp_path: Path):
    cfg = load_config("smoke", [f"data.dataset={tiny_dataset}", "train.device=cuda", "train.amp=true", "train.epochs=2"])
    result = fit(cfg, tmp_path / "run", show_progress=False)
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    image = read_volume(tiny_dataset / "imagesTs" / "ct_003.nii.gz")
    on_gpu = Predictor.from_model_dir(result.model_dir, "cuda").predict(image)
    on_cpu = Predictor.from_model_dir(result.model_dir, "cpu").predict(image)
    assert on_gpu.same_grid(image)
    assert (on_gpu.array == on_cpu.array).mean() > 0.999  # TF32/cuDNN may move a few boundary voxels


def test_bf16_or_fp16_autocast_is_used(tiny_dataset: Path, tmp_path: Path, monkeypatch):
    import medseg.training.trainer as trainer

    dtypes = []
    real = trainer.deep_supervision_loss

    def spy(loss_fn, output, label, *rest):
        dtypes.append(output.dtype if isinstance(output, torch.Tensor) else output[-1].dtype)
        return real(loss_fn, output, label, *rest)

    monkeypatch.setattr(trainer, "deep_supervision_loss", spy)
    fit(load_config("smoke", [f"data.dataset={tiny_dataset}", "train.device=cuda", "train.epochs=1"]), tmp_path / "r", show_progress=False)
    assert dtypes and dtypes[0] in (torch.bfloat16, torch.float16)


def test_accumulation_with_amp_steps_the_scaler_once_per_step(tiny_dataset: Path, tmp_path: Path, monkeypatch):
    import medseg.training.trainer as trainer

    steps = []
    real = trainer.optimizer_step

    def counting(*args, **kwargs):
        steps.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "optimizer_step", counting)
    cfg = load_config("smoke", [f"data.dataset={tiny_dataset}", "train.device=cuda", "train.amp=true",
                                "train.epochs=2", "train.accumulate=3"])
    result = fit(cfg, tmp_path / "run", show_progress=False)
    assert len(steps) == 2 * cfg.train.iterations_per_epoch
    assert all(np.isfinite(h["train_loss"]) for h in result.history)


def test_lightning_mixed_precision_on_cuda(tiny_dataset: Path, tmp_path: Path):
    import lightning.pytorch as L

    from medseg.lightning import from_config, trainer_arguments

    cfg = load_config("smoke", [f"data.dataset={tiny_dataset}", "train.device=cuda", "train.amp=true"])
    arguments = trainer_arguments(cfg)
    assert arguments["accelerator"] == "gpu" and arguments["precision"] in ("bf16-mixed", "16-mixed")
    module, data = from_config(cfg, tmp_path / "run")
    L.Trainer(**arguments, logger=False, enable_checkpointing=False).fit(module, datamodule=data)
    assert all(np.isfinite(h["train_loss"]) for h in module.state.history)
    assert Predictor.from_model_dir(tmp_path / "run" / "model_last", "cuda") is not None
