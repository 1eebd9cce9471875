"""Overlap metrics on binary masks.

Empty-mask rule: when both reference and prediction are empty the overlap is undefined and returned as NaN
(excluded from means, counted separately), as in nnU-Net; an empty prediction against a non-empty
reference (or the reverse) scores 0.
"""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient ``2|P∩R| / (|P| + |R|)`` of two boolean masks of equal shape; NaN if both empty."""
    p, r = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    denom = int(p.sum()) + int(r.sum())
    return float("nan") if denom == 0 else 2.0 * int(np.logical_and(p, r).sum()) / denom


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union (Jaccard) of two boolean masks; NaN if both empty."""
    p, r = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    union = int(np.logical_or(p, r).sum())
    return float("nan") if union == 0 else int(np.logical_and(p, r).sum()) / union


def per_label_dice(pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> dict[int, float]:
    """Dice of each label value in ``labels`` between two integer label maps."""
    return {lab: dice(pred == lab, ref == lab) for lab in labels}
