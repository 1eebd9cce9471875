"""Lesion-wise detection from connected components.

Matching rule: a reference lesion is *detected* (TP) when the predicted components overlapping it cover at
least ``overlap`` of its voxels; a predicted component is a *true positive* when at least ``overlap`` of its
voxels lie in reference lesions, otherwise it is a false positive. A reference lesion split into several
predicted components is one TP; one predicted component merging several reference lesions detects each of
them. Lesion-wise Dice is the mean, over reference lesions, of the Dice between the lesion and the union of the
predicted components touching it (0 for a missed lesion).

Empty rules: no reference lesions -> sensitivity and lesion Dice undefined (NaN); no predicted components ->
precision undefined; F1 is undefined when both are empty and 0 when exactly one is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

NAN = float("nan")


@dataclass(frozen=True)
class LesionStats:
    """Lesion-wise counts and rates for one case and label."""

    n_ref: int
    n_pred: int
    tp_ref: int  # detected reference lesions
    tp_pred: int  # predicted components that match a reference lesion
    sensitivity: float
    precision: float
    f1: float
    lesion_dice: float

    @property
    def fn(self) -> int:
        return self.n_ref - self.tp_ref

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp_pred


def components(mask: np.ndarray, connectivity: str = "full") -> tuple[np.ndarray, int]:
    """Labels connected components; ``full`` = 8/26-connectivity, ``face`` = 4/6-connectivity."""
    rank = 1 if connectivity == "face" else mask.ndim
    labelled, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, rank))
    return labelled, int(n)


def f1_score(precision: float, sensitivity: float, n_ref: int, n_pred: int) -> float:
    """F1 with the empty rules above."""
    if n_ref == 0 and n_pred == 0:
        return NAN
    if n_ref == 0 or n_pred == 0 or precision + sensitivity == 0:
        return 0.0
    return 2 * precision * sensitivity / (precision + sensitivity)


def lesion_detection(pred: np.ndarray, ref: np.ndarray, overlap: float = 0.1, connectivity: str = "full") -> LesionStats:
    """Counts detected, missed and false-positive lesions between two boolean masks of equal shape."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    ref_lab, n_ref = components(ref, connectivity)
    pred_lab, n_pred = components(pred, connectivity)
    both = ref & pred
    pairs = np.bincount(
        ref_lab[both].astype(np.int64) * (n_pred + 1) + pred_lab[both], minlength=(n_ref + 1) * (n_pred + 1)
    ).reshape(n_ref + 1, n_pred + 1)[1:, 1:]  # (n_ref, n_pred) shared voxels
    ref_sizes = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)[1:]
    pred_sizes = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)[1:]
    detected = (pairs.sum(axis=1) >= overlap * ref_sizes) & (pairs.sum(axis=1) > 0)
    matched = (pairs.sum(axis=0) >= overlap * pred_sizes) & (pairs.sum(axis=0) > 0)
    tp_ref, tp_pred = int(detected.sum()), int(matched.sum())
    sensitivity = tp_ref / n_ref if n_ref else NAN
    precision = tp_pred / n_pred if n_pred else NAN
    dices = []
    for i in range(n_ref):
        touching = np.nonzero(pairs[i])[0]
        if touching.size == 0:
            dices.append(0.0)
            continue
        shared = int(pairs[i, touching].sum())
        dices.append(2 * shared / (int(ref_sizes[i]) + int(pred_sizes[touching].sum())))
    lesion_dice = float(np.mean(dices)) if dices else NAN
    return LesionStats(
        n_ref, n_pred, tp_ref, tp_pred, sensitivity, precision, f1_score(precision, sensitivity, n_ref, n_pred), lesion_dice
    )
