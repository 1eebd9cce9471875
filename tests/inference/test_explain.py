"""Explanations (Grad-CAM through MONAI): the map lies where the network reads, on the input grid; the command,
predict --explain (saliency files, preview row, review report) and its refusals."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medseg.errors import ConfigError, ModelError
from medseg.inference.explain import Explainer, default_layer
from medseg.inference.predictor import Predictor
from medseg.io.volume import Volume
from medseg.models.folder import ModelFolder

REGION = (slice(4, 10), slice(4, 10), slice(2, 6))  # on the smoke preset's 16 x 16 x 8 patch (spacing 3, 3, 6 mm)
NEAR = (slice(3, 11), slice(3, 11), slice(1, 7))  # ... widened by the 3 x 3 x 3 kernel's reach


class RegionNet(nn.Module):
    """Reads the image only inside ``REGION`` (everything else is multiplied by 0 before the first convolution);
    label 1 wins where the features are positive, background elsewhere."""

    def __init__(self, restrict: bool = True) -> None:
        super().__init__()
        self.a = nn.Conv3d(1, 4, 3, padding=1, bias=False)
        self.b = nn.Conv3d(4, 3, 1)
        with torch.no_grad():
            self.a.weight.abs_()
            self.b.weight.zero_()
            self.b.weight[1] = 1.0
            self.b.weight[2] = -1.0
            self.b.bias.copy_(torch.tensor([0.05, 0.0, 0.0]))
        region = torch.zeros(16, 16, 8)
        region[REGION] = 1.0
        self.register_buffer("region", region[None, None] if restrict else torch.ones(1, 1, 16, 16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x * self.region)))


def _explainer(smoke_model: Path, net: nn.Module, layer: str | None = None) -> Explainer:
    folder = ModelFolder.read(smoke_model)
    return Explainer(net, Predictor.for_network(net, folder.config, folder.plan, folder.info, torch.device("cpu")), layer)


def _image(seed: int = 0) -> Volume:
    values = np.random.default_rng(seed).uniform(0, 200, (1, 16, 16, 8)).astype(np.float32)  # positive after the window
    return Volume(values, np.diag([3.0, 3.0, 6.0, 1.0]))


def test_the_map_lies_where_the_network_reads(smoke_model: Path):
    explainer = _explainer(smoke_model, RegionNet())
    assert explainer.layer == "a"  # the default: the last convolution before the 3-channel head
    explanation = explainer.explain(_image(), ["organ"])
    saliency = explanation.maps.array[0]
    assert saliency.shape == (16, 16, 8) and saliency.max() == pytest.approx(1.0)
    near = np.zeros(saliency.shape, bool)
    near[NEAR] = True
    assert saliency[near].sum() / saliency.sum() > 0.999
    assert near[np.unravel_index(saliency.argmax(), saliency.shape)]
    assert explanation.facts["empty"] == [] and explanation.facts["method"] == "gradcam"

    everywhere = _explainer(smoke_model, RegionNet(restrict=False)).explain(_image(), ["organ"]).maps.array[0]
    assert everywhere[near].sum() / everywhere.sum() < 0.5  # a network reading everything: the check notices


def test_maps_follow_the_input_grid_flipped(smoke_model: Path):
    image = _image(1)
    flipped = Volume(image.array[:, ::-1].copy(), np.diag([-3.0, 3.0, 6.0, 1.0]) @ np.array(
        [[1, 0, 0, -15], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float))  # same world positions, x stored reversed
    explainer = _explainer(smoke_model, RegionNet())
    a = explainer.explain(image, ["organ"]).maps.array[0]
    b = explainer.explain(flipped, ["organ"]).maps.array[0]
    np.testing.assert_allclose(b[::-1], a, atol=1e-5)


def test_refusals(smoke_model: Path):
    explainer = _explainer(smoke_model, RegionNet())
    with pytest.raises(ConfigError) as info:
        explainer.label_values(["spleen"])
    assert info.value.code == "OPTION_INVALID" and "organ" in (info.value.hint or "")
    with pytest.raises(ConfigError):
        _explainer(smoke_model, RegionNet(), layer="nope")
    with pytest.raises(ModelError) as model_info:
        default_layer(nn.Conv3d(1, 3, 1), torch.zeros(1, 1, 4, 4, 4), 3)  # only a head
    assert model_info.value.code == "MODEL_DIR_INVALID"


def _medseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg", "-q", *args], capture_output=True, text=True, timeout=300)


def test_explain_command_3d_and_2d(smoke_model: Path, smoke_model_2d: Path, tiny_dataset: Path, tiny_dataset_2d: Path,
                                   tmp_path: Path):
    image = sorted((tiny_dataset / "imagesTs").iterdir())[0]
    done = _medseg("explain", "-m", str(smoke_model), "-i", str(image), "-o", str(tmp_path / "x"), "-d", "cpu")
    assert done.returncode == 0, done.stderr
    source = nib.load(image)
    maps = sorted((tmp_path / "x").glob("*_saliency_*.nii.gz"))
    assert [p.name.split("_saliency_")[1] for p in maps] == ["lesion.nii.gz", "organ.nii.gz"]
    for path in maps:
        saved = nib.load(path)
        assert saved.shape == source.shape and np.allclose(saved.affine, source.affine)
        values = np.asarray(saved.dataobj)
        assert values.min() >= 0 and values.max() <= 1
    facts = json.loads(next((tmp_path / "x").glob("*_explain.json")).read_text())
    assert facts["method"] == "gradcam" and facts["layer"] and facts["labels"] == ["organ", "lesion"]
    again = _medseg("explain", "-m", str(smoke_model), "-i", str(image), "-o", str(tmp_path / "x"), "-d", "cpu")
    assert again.returncode == 2 and "OUTPUT_EXISTS" in again.stderr
    unknown = _medseg("explain", "-m", str(smoke_model), "-i", str(image), "-o", str(tmp_path / "y"), "-l", "spleen")
    assert unknown.returncode == 2 and "OPTION_INVALID" in unknown.stderr and not (tmp_path / "y").exists()

    picture = sorted((tiny_dataset_2d / "imagesTs").iterdir())[0]
    done = _medseg("explain", "-m", str(smoke_model_2d), "-i", str(picture), "-o", str(tmp_path / "p"), "-d", "cpu",
                   "--method", "gradcampp")
    assert done.returncode == 0, done.stderr
    png = next((tmp_path / "p").glob("*_saliency_*.png"))
    assert Image.open(png).size[0] > 100
    assert json.loads(next((tmp_path / "p").glob("*_explain.json")).read_text())["method"] == "gradcampp"


def test_predict_explain_writes_maps_the_preview_row_and_the_review_report(smoke_model: Path, tiny_dataset: Path,
                                                                          tmp_path: Path):
    inputs = tiny_dataset / "imagesTs"
    plain = _medseg("predict", "-i", str(inputs), "-o", str(tmp_path / "plain"), "-m", str(smoke_model), "--preview")
    assert plain.returncode == 0, plain.stderr
    done = _medseg("predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(smoke_model), "--preview",
                   "--explain")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    case = manifest["cases"][0]
    assert "saliency" in case["outputs"] and "explain_s" in case["timings"]
    saliency = nib.load(tmp_path / "out" / case["outputs"]["saliency"]["file"])
    image = nib.load(sorted(inputs.iterdir())[0])
    assert saliency.shape == (*image.shape, 2) and np.allclose(saliency.affine, image.affine)  # organ, lesion
    assert 0 <= float(np.asarray(saliency.dataobj).min()) and float(np.asarray(saliency.dataobj).max()) <= 1.0 + 1e-6
    name = case["outputs"]["preview"]["file"]
    assert Image.open(tmp_path / "out" / name).size[1] > 1.8 * Image.open(tmp_path / "plain" / name).size[1]  # 2 rows
    report = _medseg("report", str(tmp_path / "out"))
    assert report.returncode == 0, report.stderr
    html = (tmp_path / "out" / "review.html").read_text()
    assert html.count("data:image/png;base64") >= len(manifest["cases"])
