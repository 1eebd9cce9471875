"""Validation during training: each validation case predicted on its preprocessed grid by the code of
``medseg predict`` (:meth:`medseg.inference.predictor.Predictor.for_network`), scored by Dice per label."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

from medseg.metrics.overlap import per_label_dice
from medseg.transforms.pipeline import IMAGE, LABEL


def validate(model: nn.Module, predictor, val_ds, labels: list[int],
             on_case: Callable[[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None] | None = None) -> dict[int, float]:
    """Mean Dice per label over the validation cases, each predicted on its preprocessed grid by ``predictor``
    (:meth:`medseg.inference.predictor.Predictor.for_network` over ``model``: the code of ``medseg predict``).

    ``on_case(case_id, image (C, *spatial), prediction, reference, affine)`` sees each case (e.g. the TensorBoard overlay)."""
    was_training = model.training
    model.eval()
    scores: dict[int, list[float]] = {lab: [] for lab in labels}
    for index in range(len(val_ds)):
        item = val_ds[index]
        pred = predictor.predict_preprocessed(item[IMAGE].as_tensor()).astype(np.int64)  # (X, Y[, Z])
        ref = item[LABEL].as_tensor()[0].cpu().numpy().round().astype(np.int64)
        if on_case is not None:
            image = item[IMAGE]
            on_case(str(item["case_id"]), image.as_tensor().cpu().numpy(), pred, ref, image.affine.cpu().numpy())
        for lab, value in per_label_dice(pred, ref, labels).items():
            scores[lab].append(value)
    model.train(was_training)
    return {lab: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan") for lab, v in scores.items()}
