"""Lesion-wise detection on constructed cases with hand-computed counts."""

import math

import numpy as np
import pytest

from medseg.metrics.lesion import lesion_detection


def _cube(mask: np.ndarray, corner: tuple[int, int, int], size: int) -> None:
    x, y, z = corner
    mask[x : x + size, y : y + size, z : z + size] = True


@pytest.fixture
def empty() -> np.ndarray:
    return np.zeros((40, 40, 20), bool)


def test_perfect_detection(empty):
    ref = empty.copy()
    _cube(ref, (2, 2, 2), 4)
    _cube(ref, (20, 20, 10), 5)
    s = lesion_detection(ref, ref)
    assert (s.n_ref, s.n_pred, s.tp_ref, s.tp_pred, s.fp, s.fn) == (2, 2, 2, 2, 0, 0)
    assert s.sensitivity == s.precision == s.f1 == s.lesion_dice == 1.0


def test_missed_and_extra_lesions(empty):
    ref, pred = empty.copy(), empty.copy()
    _cube(ref, (2, 2, 2), 4)  # found
    _cube(ref, (20, 2, 2), 4)  # missed
    _cube(pred, (2, 2, 2), 4)
    _cube(pred, (30, 30, 10), 3)  # extra
    _cube(pred, (10, 30, 10), 3)  # extra
    s = lesion_detection(pred, ref)
    assert (s.tp_ref, s.fn, s.tp_pred, s.fp) == (1, 1, 1, 2)
    assert s.sensitivity == 0.5 and s.precision == pytest.approx(1 / 3)
    assert s.f1 == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert s.lesion_dice == pytest.approx((1.0 + 0.0) / 2)


def test_split_lesion_is_one_detection_without_false_positives(empty):
    ref, pred = empty.copy(), empty.copy()
    ref[5:15, 5:9, 5:9] = True  # one elongated lesion
    pred[5:9, 5:9, 5:9] = True  # predicted as two pieces
    pred[11:15, 5:9, 5:9] = True
    s = lesion_detection(pred, ref)
    assert (s.n_ref, s.n_pred, s.tp_ref, s.tp_pred, s.fp, s.fn) == (1, 2, 1, 2, 0, 0)
    assert s.lesion_dice == pytest.approx(2 * 128 / (160 + 128))


def test_merged_prediction_detects_both_lesions(empty):
    ref, pred = empty.copy(), empty.copy()
    _cube(ref, (5, 5, 5), 4)
    _cube(ref, (11, 5, 5), 4)
    pred[5:15, 5:9, 5:9] = True  # one component bridging both
    s = lesion_detection(pred, ref)
    assert (s.n_ref, s.n_pred, s.tp_ref, s.tp_pred, s.fp, s.fn) == (2, 1, 2, 1, 0, 0)
    assert s.f1 == 1.0


def test_overlap_threshold(empty):
    ref, pred = empty.copy(), empty.copy()
    ref[0:10, 0:10, 0:2] = True  # 200 voxels
    pred[0:1, 0:10, 0:2] = True  # covers 10% of it, and lies fully inside
    assert lesion_detection(pred, ref, overlap=0.1).tp_ref == 1
    assert lesion_detection(pred, ref, overlap=0.2).tp_ref == 0


def test_empty_rules(empty):
    ref = empty.copy()
    _cube(ref, (2, 2, 2), 3)
    none = lesion_detection(empty, empty)
    assert none.n_ref == 0 and math.isnan(none.f1) and math.isnan(none.sensitivity) and math.isnan(none.lesion_dice)
    missed = lesion_detection(empty, ref)
    assert missed.sensitivity == 0 and math.isnan(missed.precision) and missed.f1 == 0 and missed.lesion_dice == 0
    extra = lesion_detection(ref, empty)
    assert math.isnan(extra.sensitivity) and extra.precision == 0 and extra.f1 == 0 and extra.fp == 1


def test_connectivity_choice(empty):
    ref = empty.copy()
    ref[2, 2, 2] = ref[3, 3, 3] = True  # touch only at a corner
    assert lesion_detection(ref, ref, connectivity="full").n_ref == 1
    assert lesion_detection(ref, ref, connectivity="face").n_ref == 2
