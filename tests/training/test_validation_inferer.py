"""Validation during training predicts through medseg predict's code (Predictor), not a second inferer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medseg.config import load_config
from medseg.inference.predictor import Predictor
from medseg.io.readers import read_volume
from medseg.models.folder import load_model_dir
from medseg.transforms.pipeline import IMAGE, build_infer_transforms, volume_to_metatensor


def test_validation_uses_the_predictor(tiny_dataset: Path, tmp_path: Path, monkeypatch):
    import monai.inferers

    from medseg.training.trainer import fit

    calls = []
    plain = Predictor._stitch

    def counting(self, *args, **kwargs):
        calls.append(self.members[0].model_dir.name)
        return plain(self, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("validation must not use a second inferer")

    monkeypatch.setattr(Predictor, "_stitch", counting)
    monkeypatch.setattr(monai.inferers, "sliding_window_inference", forbidden)
    cfg = load_config("smoke", [f"data.dataset={tiny_dataset}", "train.epochs=2", "train.val_every=1"])
    result = fit(cfg, tmp_path / "run", show_progress=False)
    assert calls == ["training"] * 2  # one validation case, validated after each of the 2 epochs
    assert 0 <= result.best_metric <= 1

    # the shipped model folder predicts the validation case as validation did (to float rounding: the folder's
    # predictor runs the network in channels-last layout on CPU)
    net, mcfg, plan, info = load_model_dir(result.model_dir)
    val_id = json.loads((tmp_path / "run" / "splits.json").read_text())["val"][0]
    image = build_infer_transforms(mcfg, plan)({IMAGE: volume_to_metatensor(read_volume(
        tiny_dataset / "imagesTr" / f"{val_id}.nii.gz"))})[IMAGE].as_tensor()
    shipped = Predictor.from_model_dir(result.model_dir, "cpu").predict_preprocessed(image)
    validated = Predictor.for_network(net, mcfg, plan, info, torch.device("cpu")).predict_preprocessed(image)
    assert shipped.shape == validated.shape and (shipped == validated).mean() > 0.999
