#!/usr/bin/env bash
# One prepared call on a lent GPU machine (the `device` tool runs it in the repository root): installs medseg with a
# CUDA torch and medseg[tensorrt], runs the `gpu`-marked tests and the GPU benchmarks, and writes JSON and logs
# under $OUT (default benchmarks/results/gpu): the TensorRT tests and benchmark (issue 30), nnU-Net against medseg (issue 26), the device-resident
# prediction test and the pipeline breakdown on CUDA (issue 28). Keep it under 8 minutes.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
python3 -m venv /tmp/gpu-venv
PIP="/tmp/gpu-venv/bin/python -m pip install -q"
$PIP -c requirements/lock.txt pip setuptools wheel
$PIP torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 --extra-index-url https://pypi.org/simple || $PIP torch==2.13.0
$PIP -c requirements/lock.txt -e ".[test]"
$PIP onnxruntime-gpu tensorrt 2>&1 | tail -2   # medseg[tensorrt], in place of the CPU onnxruntime
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" 2>&1
/tmp/gpu-venv/bin/python -m pytest -q -m gpu -p no:cacheprovider -s tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
RESULTS="$OUT" /tmp/gpu-venv/bin/python benchmarks/tensorrt.py --name tensorrt_gpu 2>&1 | tail -30
cp benchmarks/results/tensorrt_gpu.json "$OUT/" 2>/dev/null || true
# issue 28: the per-case breakdown on the GPU (device-resident slabs, normalisation, windows, blending, argmax, QC)
timeout 240 /tmp/gpu-venv/bin/python benchmarks/pipeline.py --device cuda --threads 8 --baseline "" --name pipeline_gpu 2>&1 | tail -40
cp benchmarks/results/pipeline_gpu.json "$OUT/" 2>/dev/null || true
# issue 26: nnU-Net results folders, medseg against nnUNetv2_predict on the GPU (nnunetv2 from the registry when
# reachable; the benchmark needs it for its reference side)
$PIP -c requirements/lock.txt nnunetv2==2.8.1 2>&1 | tail -2 && \
  timeout 240 /tmp/gpu-venv/bin/python benchmarks/nnunet.py --device cuda --tta --rounds 2 --name nnunet_gpu 2>&1 | tail -30
cp benchmarks/results/nnunet_gpu.json "$OUT/" 2>/dev/null || true
