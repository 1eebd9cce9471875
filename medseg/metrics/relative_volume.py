"""Relative volume difference (RVD), as the LiTS challenge reports it: ``(V_pred − V_ref) / V_ref`` (signed; 0 is
perfect, −1 an empty prediction). Derived from the row's volumes, so it is this module and one registration."""

from __future__ import annotations

import math

from medseg.metrics.catalogue import Metric, register_metric


def relative_volume_difference(row: dict) -> float:
    """``(vol_pred_ml − vol_ref_ml) / vol_ref_ml``; NaN when the reference is empty.

    Examples:
        >>> relative_volume_difference({"vol_ref_ml": 20.0, "vol_pred_ml": 25.0})
        0.25
        >>> relative_volume_difference({"vol_ref_ml": 0.0, "vol_pred_ml": 3.0})
        nan
    """
    ref, pred = float(row["vol_ref_ml"]), float(row["vol_pred_ml"])
    return (pred - ref) / ref if ref > 0 else math.nan


register_metric(Metric("rvd", "RVD", "(predicted − reference volume) / reference volume (LiTS)",
                       "undefined when the reference is empty", card=True, mlflow=True,
                       derive=relative_volume_difference))
