"""nnU-Net v2 results folders for tests, written in nnU-Net's own layout and checkpoint format (what its trainer's
``save_checkpoint`` writes: weights, optimizer state, logger lists of numpy floats, ``init_args`` with a torch device)
with dynamic-network-architectures' PlainConvUNet. ``tests/models/test_nnunet_parity.py`` makes the same with real
nnU-Net; these are for the tests that need no nnU-Net install."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

ARCH_3D = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
RESAMPLE_DATA = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
RESAMPLE_PROBS = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}


def plans(patch=(8, 16, 16), spacing=(3.0, 1.0, 1.0), scheme="CTNormalization", transpose=(0, 1, 2)) -> dict:
    backward = [int(i) for i in np.argsort(transpose)]
    return {
        "dataset_name": "Dataset901_Tiny", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose), "transpose_backward": backward,
        "original_median_spacing_after_transp": list(spacing), "original_median_shape_after_transp": [20, 40, 40],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 400.0, "mean": 60.0, "median": 55.0, "min": -200.0, "percentile_00_5": -150.0,
            "percentile_99_5": 350.0, "std": 90.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": list(patch), "median_image_size_in_voxels": [20, 40, 40], "spacing": list(spacing),
            "normalization_schemes": [scheme], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": RESAMPLE_DATA, "resampling_fn_seg_kwargs": {**RESAMPLE_DATA, "is_seg": True, "order": 1},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": RESAMPLE_PROBS, "architecture": copy.deepcopy(ARCH_3D), "batch_dice": False}},
    }


DATASET_LABELS = {0: "background", 1: "liver", 2: "tumour"}
DATASET = {"channel_names": {"0": "CT"}, "labels": {v: k for k, v in DATASET_LABELS.items()}, "numTraining": 4,
           "file_ending": ".nii.gz"}


def network(p: dict, channels: int = 1, classes: int = 3, seed: int = 0) -> torch.nn.Module:
    from medseg.models.nnunet import build_network

    torch.manual_seed(seed)
    net = build_network(p["configurations"]["3d_fullres"]["architecture"], channels, classes)
    with torch.no_grad():  # confident, structured outputs from an untrained network: scale the final head
        for name, param in net.named_parameters():
            if "seg_layers" in name:
                param.mul_(20.0)
    return net


def checkpoint(net: torch.nn.Module, p: dict, dataset: dict, fold: int | str = 0,
               mirroring=(0, 1, 2), trainer: str = "nnUNetTrainer") -> dict:
    return {
        "network_weights": net.state_dict(),
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.99, "nesterov": True, "params": [0]}]},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.25), np.float64(0.5)], "ema_fg_dice": [np.float64(0.3)],
                    "dice_per_class_or_region": [[np.float32(0.1), np.float32(0.2)]], "train_losses": [np.float32(-0.1)],
                    "val_losses": [-0.2], "lrs": [0.01], "epoch_start_timestamps": [1.0], "epoch_end_timestamps": [2.0]},
        "_best_ema": np.float64(0.3),
        "current_epoch": 2,
        "init_args": {"plans": p, "configuration": "3d_fullres", "fold": fold, "dataset_json": dataset,
                      "device": torch.device("cpu")},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": tuple(mirroring) if mirroring is not None else None,
    }


def write_results_folder(root: Path, folds=(0,), p: dict | None = None, dataset: dict | None = None,
                         mirroring=(0, 1, 2), seed: int = 0) -> Path:
    """``root/nnUNetTrainer__nnUNetPlans__3d_fullres`` with one checkpoint_final.pth per fold (different weights)."""
    p = p or plans()
    dataset = dataset or DATASET
    folder = root / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(p))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    channels = len(dataset["channel_names"])
    for i, fold in enumerate(folds):
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(checkpoint(network(p, channels, len(dataset["labels"]), seed=seed + i), p, dataset, fold, mirroring),
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def ct_image(shape=(40, 36, 18), seed: int = 0) -> np.ndarray:
    """A CT-like int16 volume (X, Y, Z): air border, a body, two blobs."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    img = np.full(shape, -1000.0)
    body = x ** 2 + y ** 2 < 0.7
    img[body] = 40
    img[(x - 0.2) ** 2 + y ** 2 + z ** 2 < 0.15] = 120
    img[(x + 0.3) ** 2 + (y - 0.2) ** 2 + (z + 0.2) ** 2 < 0.05] = 250
    img += rng.normal(0, 10, shape)
    img[0, :, :] = 0  # a zero border so that cropping to the non-zero region has work to do
    return img.astype(np.int16)


def serve_http_answer(model: Path, body: bytes, timeout: float = 180) -> bytes:
    """Starts ``medseg serve-http -m model`` on a free 127.0.0.1 port, waits for /ping, posts ``body`` to
    /invocations and returns the answer's bytes (asserting 200); the server is stopped afterwards."""
    import subprocess
    import sys
    import time

    import requests
    from orthanc import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "medseg", "serve-http", "-m", str(model), "--host", "127.0.0.1",
                               "--port", str(port), "-d", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.time() < deadline, "serve-http did not start"
            time.sleep(0.3)
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", data=body, timeout=300)
        assert answer.status_code == 200, answer.text[:500]
        return answer.content
    finally:
        server.terminate()
        server.wait(timeout=60)
