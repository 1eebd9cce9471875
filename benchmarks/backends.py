"""Inference backends on this CPU: patches/s and whole-case time, as ratios to PyTorch in the same run.

    .venv/bin/python benchmarks/backends.py -m RUN/model [--case sample_data/ct3d/imagesTs/ct_013.nii.gz]

Exports the model to TorchScript, ONNX and ONNX int8 (temporary folders), then for each backend:
  * patches/s: the network on batches of sw_batch_size patches of the model's patch size (median of 10, after 2 warm-ups);
  * whole-case time: Predictor.predict on one volume (preprocessing, sliding window, resampling back), median of 3;
  * Dice against the PyTorch labels on that case (identical labels give 1.0).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_time, save

from medseg.deploy.export import export_model
from medseg.inference.predictor import Predictor
from medseg.io.nifti import read_nifti
from medseg.metrics.overlap import dice

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--model", type=Path, required=True)
    parser.add_argument("--case", type=Path, default=ROOT / "sample_data" / "ct3d" / "imagesTs" / "ct_013.nii.gz")
    args = parser.parse_args()
    volume = read_nifti(args.case)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {
            "torch": args.model,
            "torchscript": export_model(args.model, "torchscript", Path(tmp) / "ts"),
            "onnxruntime": export_model(args.model, "onnx", Path(tmp) / "onnx"),
            "openvino": Path(tmp) / "onnx",
            "onnxruntime_int8": export_model(args.model, "onnx", Path(tmp) / "int8", quantize="int8"),
        }
        backend_of = {"torch": "torch", "torchscript": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino",
                      "onnxruntime_int8": "onnxruntime"}
        results, reference = {}, None
        for name, folder in folders.items():
            predictor = Predictor.from_model_dir(folder, "cpu", backend_of[name])
            cfg = predictor.cfg
            batch = torch.randn(cfg.inference.sw_batch_size, int(predictor.info["in_channels"]), *cfg.data.patch_size)
            with torch.no_grad():
                patch_s = median_time(lambda: predictor.members[0].backend(batch), repeats=10, warmup=2)  # noqa: B023 - timed within this iteration
                case_s = median_time(lambda: predictor.predict(volume), repeats=3, warmup=1)  # noqa: B023
                labels = predictor.predict(volume).array
            reference = labels if reference is None else reference
            results[name] = {
                "patches_per_s": round(cfg.inference.sw_batch_size / patch_s, 2),
                "whole_case_s": round(case_s, 3),
                "label_agreement": float((labels == reference).mean()),
                "dice_vs_torch": {int(k): dice(labels == k, reference == k) for k in predictor.labels if k},
            }
    torch_patch, torch_case = results["torch"]["patches_per_s"], results["torch"]["whole_case_s"]
    for r in results.values():
        r["patches_ratio_to_torch"] = round(r["patches_per_s"] / torch_patch, 3)
        r["whole_case_speedup_vs_torch"] = round(torch_case / r["whole_case_s"], 3)
    fastest = max(results, key=lambda n: results[n]["whole_case_speedup_vs_torch"])
    save("backends", {
        "what": "CPU inference backends; model " + str(args.model), "case": str(args.case.name),
        "patch_size": list(cfg.data.patch_size), "sw_batch_size": cfg.inference.sw_batch_size,
        "torch_threads": torch.get_num_threads(), "backends": results, "fastest_whole_case": fastest,
    })


if __name__ == "__main__":
    main()
