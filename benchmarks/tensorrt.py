"""TensorRT (ONNX Runtime's TensorRT execution provider, fp16 and fp32) against the PyTorch CUDA path on the same
volume and model, in one run on one GPU. Needs CUDA and medseg[tensorrt]; `benchmarks/gpu.sh` runs it.

    python benchmarks/tensorrt.py [-m MODEL] [--shape 512 512 96]

Without -m it trains the organ3d_unet preset on the sample data for a few epochs (the network's speed, not its
Dice, is measured). For each path: the first call (engine build included for TensorRT), then the median of 3 whole
predict_case calls (QC off) on one synthetic CT of --shape, and the share of voxels whose label equals PyTorch's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_time, save

from medseg.config import load_config
from medseg.deploy.export import export_model
from medseg.inference.predictor import Predictor
from medseg.io.readers import read_volume
from medseg.io.volume import Volume

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--model", type=Path)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 96])
    parser.add_argument("--name", default="tensorrt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        data = ROOT / "sample_data" / "ct3d"
        if model is None:
            from medseg.training.trainer import fit

            cfg = load_config("organ3d_unet", [f"data.dataset={data}", "train.epochs=2", "train.iterations_per_epoch=10"])
            model = fit(cfg, Path(tmp) / "run", show_progress=False).model_dir
        onnx = export_model(model, "onnx", Path(tmp) / "onnx")
        source = read_volume(sorted((data / "imagesTs").iterdir())[0])
        reps = [int(np.ceil(t / s)) for t, s in zip(args.shape, source.spatial_shape)]
        array = np.tile(np.asarray(source.array), (1, *reps))[(slice(None), *[slice(0, t) for t in args.shape])]
        volume = Volume(np.ascontiguousarray(array), source.affine)
        rows, reference = {}, None
        for name, folder, backend in (("pytorch_cuda", model, "torch"), ("tensorrt_fp16", onnx, "tensorrt"),
                                      ("tensorrt_fp32", onnx, "tensorrt-fp32")):
            start = time.perf_counter()
            predictor = Predictor.from_model_dir(folder, "cuda", backend=backend)
            labels = predictor.predict_case(volume, qc=False).labels.array
            first = time.perf_counter() - start
            predict_s = median_time(lambda predictor=predictor: predictor.predict_case(volume, qc=False), 3, 0)
            reference = labels if reference is None else reference
            rows[name] = {"first_call_s": first, "predict_s": predict_s,
                          "label_agreement_vs_pytorch": float((labels == reference).mean())}
        for name in ("tensorrt_fp16", "tensorrt_fp32"):
            rows[name]["speedup_vs_pytorch_cuda"] = rows["pytorch_cuda"]["predict_s"] / rows[name]["predict_s"]
    save(args.name, {"shape": args.shape, "results": rows})


if __name__ == "__main__":
    main()
