"""LiteRT export of a 2D network: file sizes, CPU latency per window and whole-image time, and agreement with
PyTorch, float32 and int8 against PyTorch measured in the same run. Needs medseg[litert] (`make test-litert`
builds .venv-litert):

    .venv-litert/bin/python benchmarks/litert.py [--epochs 10]

Trains the lesion2d_unetpp preset's data setup with a UNet (UNet++ converts too, but its export is not tested) on
sample_data/derm2d for a few epochs, exports it float32 and int8 (calibrated on the training cases), then times
(median of 20 after 3 warm-ups, one thread, batch 1 window) the network alone: PyTorch vs the LiteRT interpreter;
and `predict_case` on every test image, with the share of pixels whose label equals PyTorch's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_time, save

from medseg.config import load_config
from medseg.deploy.export import _FinalOutput, export_model
from medseg.inference.backends import LITERT_FILE, LiteRTInterpreter
from medseg.inference.predictor import Predictor
from medseg.io.readers import read_volume
from medseg.models.folder import ModelFolder
from medseg.training.trainer import fit

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "derm2d"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("lesion2d_unetpp", [f"data.dataset={DATA}", "model.name=unet", "model.channels=[16, 32, 64, 128]",
                                              "model.strides=[2, 2, 2]", "model.deep_supervision=false", f"train.epochs={args.epochs}",
                                              "train.iterations_per_epoch=20", "data.num_workers=0", "train.device=cpu",
                                              "inference.tta=false"])
        model = fit(cfg, Path(tmp) / "run", show_progress=False).model_dir
        folders = {"float32": export_model(model, "tflite", Path(tmp) / "f32"),
                   "int8": export_model(model, "tflite", Path(tmp) / "int8", quantize="int8", calibration=DATA)}
        source = ModelFolder.read(model)
        net = _FinalOutput(source.load_network("cpu")).eval()
        window = torch.randn(1, source.in_channels, *source.config.data.patch_size)
        with torch.no_grad():
            torch_s = median_time(lambda: net(window), 20, 3)
        images = [read_volume(p) for p in sorted((DATA / "imagesTs").iterdir())]
        reference = Predictor.from_model_dir(model, "cpu")
        start = time.perf_counter()
        ref_labels = [reference.predict_case(im, qc=False).labels.array for im in images]
        torch_case_s = (time.perf_counter() - start) / len(images)
        rows = {"pytorch": {"window_s": torch_s, "per_image_s": torch_case_s,
                            "weights_bytes": (model / "weights.pt").stat().st_size}}
        for name, folder in folders.items():
            interpreter = LiteRTInterpreter(folder / LITERT_FILE, threads=1)
            window_s = median_time(lambda interpreter=interpreter: interpreter(window), 20, 3)
            predictor = Predictor.from_model_dir(folder, "cpu")
            start = time.perf_counter()
            labels = [predictor.predict_case(im, qc=False).labels.array for im in images]
            per_image = (time.perf_counter() - start) / len(images)
            agreement = [float((a == b).mean()) for a, b in zip(labels, ref_labels)]
            rows[name] = {"file_bytes": (folder / LITERT_FILE).stat().st_size, "window_s": window_s,
                          "window_speed_vs_pytorch": torch_s / window_s, "per_image_s": per_image,
                          "label_agreement_min": min(agreement), "label_agreement_mean": float(np.mean(agreement)),
                          "parity": ModelFolder.read(folder).info["parity"]}
    save("litert", {"setup": {"data": "sample_data/derm2d", "network": "unet 16-32-64-128", "epochs": args.epochs,
                              "patch": list(source.config.data.patch_size or ()), "threads": 1,
                              "test_images": len(images)}, "results": rows})


if __name__ == "__main__":
    main()
