import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_iou

from medseg.metrics.overlap import dice, iou


def _monai(fn, pred: np.ndarray, ref: np.ndarray) -> float:
    p = torch.from_numpy(pred[None, None].astype(np.float32))
    r = torch.from_numpy(ref[None, None].astype(np.float32))
    return float(fn(p, r, include_background=True)[0, 0])


@pytest.mark.parametrize("seed", range(5))
def test_dice_and_iou_match_monai_on_random_masks(seed: int):
    rng = np.random.default_rng(seed)
    pred = rng.random((17, 13, 9)) < rng.uniform(0.1, 0.6)
    ref = rng.random((17, 13, 9)) < rng.uniform(0.1, 0.6)
    assert abs(dice(pred, ref) - _monai(compute_dice, pred, ref)) < 1e-6
    assert abs(iou(pred, ref) - _monai(compute_iou, pred, ref)) < 1e-6


def test_hand_computed_values():
    ref = np.zeros((10, 10), bool)
    ref[:4, :5] = True  # 20 voxels
    pred = np.zeros((10, 10), bool)
    pred[2:6, :5] = True  # 20 voxels, 10 shared
    assert dice(pred, ref) == pytest.approx(0.5)
    assert iou(pred, ref) == pytest.approx(10 / 30)


def test_empty_mask_rules():
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    assert math.isnan(dice(empty, empty)) and math.isnan(iou(empty, empty))
    assert dice(empty, full) == 0.0 and dice(full, empty) == 0.0
