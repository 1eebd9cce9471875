"""`medseg train -c smoke --set model.name=NAME` for the networks added beside medseg's own (MONAI's segresnet and
swinunetr, nnU-Net's resenc_unet, HF's segformer), in 2D and 3D where the network has them: training runs end to end (plan, epochs, validation through the predictor, model folder), and the model folder
predicts a test image onto its exact grid."""

from __future__ import annotations

from pathlib import Path

import pytest
from network_sizes import needs
from typer.testing import CliRunner

from medseg.cli import app
from medseg.inference.predictor import Predictor
from medseg.io.readers import read_volume

SWIN = ["model.channels=[12, 24, 48, 96, 192, 384]", "model.strides=[2, 2, 2, 2, 2]"]
CASES = {  # name, dims -> extra --set (swinunetr halves every axis five times: patches are multiples of 32)
    ("segresnet", 3): [],
    ("segresnet", 2): ["data.spacing=[2.0, 2.0]", "data.patch_size=[32, 32]", "data.intensity.scheme=rgb"],
    ("swinunetr", 3): [*SWIN, "data.patch_size=[64, 32, 32]"],
    ("swinunetr", 2): [*SWIN, "data.spacing=[2.0, 2.0]", "data.patch_size=[64, 64]", "data.intensity.scheme=rgb"],
    ("resenc_unet", 3): ["model.deep_supervision=true"],
    ("resenc_unet", 2): ["data.spacing=[2.0, 2.0]", "data.patch_size=[32, 32]", "data.intensity.scheme=rgb"],
    ("segformer", 2): ["model.channels=null", "model.strides=null", "data.spacing=[2.0, 2.0]", "data.patch_size=null",
                       "data.intensity.scheme=rgb"],  # the plan sizes it: patch a multiple of 32, five levels
    ("smp", 2): ["model.channels=null", "model.strides=null", "data.spacing=[2.0, 2.0]", "data.patch_size=null",
                 "data.intensity.scheme=rgb", "model.encoder=tu-mobilenetv3_small_050", "model.arch=FPN"],
    ("deeplabv3", 2): ["model.channels=null", "model.strides=null", "data.spacing=[2.0, 2.0]", "data.patch_size=null",
                       "data.intensity.scheme=rgb", "model.encoder=mobilenet_v3_large"],
}


@pytest.mark.parametrize("name,dims", [pytest.param(n, d, marks=needs(n)) for n, d in CASES])
def test_smoke_training_and_prediction(name: str, dims: int, tiny_dataset: Path, tiny_dataset_2d: Path, tmp_path: Path):
    dataset = tiny_dataset if dims == 3 else tiny_dataset_2d
    sets = [f"data.dataset={dataset}", f"model.name={name}", "train.iterations_per_epoch=1", *CASES[(name, dims)]]
    result = CliRunner().invoke(app, ["train", "-c", "smoke", "-o", str(tmp_path / "run"),
                                      *[arg for s in sets for arg in ("--set", s)]])
    assert result.exit_code == 0, result.output + repr(result.exception)
    model = tmp_path / "run" / "model"
    assert (model / "weights.pt").is_file()
    if name in ("segformer", "smp"):
        plan = (tmp_path / "run" / "plan.json").read_text()
        assert all(p % 32 == 0 for p in Predictor.from_model_dir(model, "cpu").plan.patch_size), plan
    predictor = Predictor.from_model_dir(model, "cpu")
    assert predictor.cfg.model.name == name
    image = read_volume(sorted((dataset / "imagesTs").iterdir())[0])
    labels = predictor.predict(image)
    assert labels.same_grid(image) and labels.array.shape[1:] == image.array.shape[1:]


def test_swinunetr_with_smoke_strides_is_refused_with_the_fix(tiny_dataset: Path, tmp_path: Path):
    result = CliRunner().invoke(app, ["train", "-c", "smoke", "-o", str(tmp_path / "run"), "--set",
                                      f"data.dataset={tiny_dataset}", "--set", "model.name=swinunetr"])
    assert result.exit_code != 0 and getattr(result.exception, "code", None) == "CONFIG_INVALID_VALUE"
    assert "[2, 2, 2, 2, 2]" in str(result.exception)
