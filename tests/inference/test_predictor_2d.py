from pathlib import Path

import numpy as np
from PIL import Image

from medseg.inference.predictor import Predictor
from medseg.inference.runner import predict_folder
from medseg.metrics.evaluate import evaluate_folders


def test_png_in_png_out_same_size(smoke_model_2d: Path, tiny_dataset_2d: Path, tmp_path: Path):
    predictor = Predictor.from_model_dir(smoke_model_2d, "cpu")
    results = predict_folder(predictor, tiny_dataset_2d / "imagesTs", tmp_path / "pred")
    assert [r.status for r in results] == ["ok"] and results[0].output == "derm_003.png"
    image = np.asarray(Image.open(tiny_dataset_2d / "imagesTs" / "derm_003.png"))
    mask = np.asarray(Image.open(tmp_path / "pred" / "derm_003.png"))
    assert mask.shape == image.shape[:2] and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    summary = evaluate_folders(tmp_path / "pred", tiny_dataset_2d / "labelsTs", tmp_path / "ev", labels={1: "lesion"})
    assert summary["lesion"]["dice"]["n"] + summary["lesion"]["dice"]["n_undefined"] == 1


def test_2d_model_folder_records_plan_and_clahe(smoke_model_2d: Path):
    import json

    import yaml

    cfg = yaml.safe_load((smoke_model_2d / "config.yaml").read_text())
    assert cfg["data"]["clahe"]["enabled"] is True and cfg["data"]["intensity"]["scheme"] == "rgb"
    assert json.loads((smoke_model_2d / "plan.json").read_text())["dims"] == 2
