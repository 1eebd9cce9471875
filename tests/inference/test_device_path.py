"""The device-resident per-case path on CUDA (stored slabs to the GPU, normalisation, windows, blending, argmax and
QC sums there) against the CPU path: the same labels and QC verdicts on the sample data and on flipped, oblique and
resampled inputs. Needs a CUDA GPU (``pytest -m gpu``; ``benchmarks/gpu.sh`` runs it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.inference.predictor import Predictor
from medseg.io.readers import read_volume
from medseg.io.volume import Volume
from tests.conftest import oblique_affine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _inputs(tiny_dataset: Path) -> dict[str, Volume]:
    image = read_volume(sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0])
    flipped = Volume(np.ascontiguousarray(image.array[:, ::-1, :, ::-1]), image.affine @ np.diag([-1, 1, -1, 1]))
    oblique = Volume(image.array, oblique_affine(tuple(np.linalg.norm(image.affine[:3, :3], axis=0)), 17.0, (1, -1, 1)))
    resampled = Volume(image.array, image.affine @ np.diag([0.7, 0.9, 1.3, 1.0]))
    return {"sample": image, "flipped": flipped, "oblique": oblique, "resampled": resampled}


def test_device_path_gives_the_cpu_path_labels_and_verdicts(smoke_model: Path, tiny_dataset: Path):
    on_gpu, on_cpu = Predictor.from_model_dir(smoke_model, "cuda"), Predictor.from_model_dir(smoke_model, "cpu")
    for name, volume in _inputs(tiny_dataset).items():
        gpu, cpu = on_gpu.predict_case(volume, qc=True), on_cpu.predict_case(volume, qc=True)
        agreement = float((gpu.labels.array == cpu.labels.array).mean())
        assert agreement >= 0.999, (name, agreement)  # cuDNN's convolutions round differently from the CPU's
        assert gpu.qc["verdict"] == cpu.qc["verdict"], name
        np.testing.assert_array_equal(gpu.labels.affine, volume.affine)
