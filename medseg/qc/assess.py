"""The per-case QC verdict: ``ok`` or ``review``, with reasons in plain language and a score in [0, 1].

Score: the lowest agreement over labels and groups (ensemble, TTA) when there is one, else one minus the highest
per-label uncertainty; halved for every plausibility reason (volume, components, border, intensity, spacing,
empty). Higher is more trustworthy; cases are reviewed lowest first. The verdict is ``review`` when any reason
holds (the thresholds of ``inference.qc``).
"""

from __future__ import annotations

PLAUSIBILITY = ("EMPTY", "VOLUME", "COMPONENTS", "BORDER", "INTENSITY", "SPACING")


def _reason(code: str, text: str, label: str | None = None) -> dict:
    return {"code": code, "label": label, "text": text}


def assess(reference: dict | None, label_stats: dict[str, dict], percentiles: list[list[float]],
           spacing: list[float], signals: dict, settings) -> dict:
    """Checks one prediction.

    Args:
        reference: ``model.json["qc"]`` (:func:`medseg.qc.reference.qc_reference`), or None for a model folder
            made before QC existed (only the agreement and uncertainty checks then run).
        label_stats: Per label name, :func:`medseg.plan.statistics.label_stats` of the prediction.
        percentiles: The input's intensity percentiles per channel (:func:`medseg.plan.statistics.image_percentiles`).
        spacing: The input's spacing per RAS axis (mm).
        signals: :meth:`medseg.qc.signals.QcAccumulator.result`.
        settings: ``inference.qc`` (:class:`medseg.config.QcConfig`).

    Returns:
        ``{"verdict", "score", "reasons": [{"code", "label", "text"}], "signals": {...}}``.
    """
    reasons: list[dict] = []
    ref_labels = (reference or {}).get("labels", {})
    for name, s in label_stats.items():
        ref = ref_labels.get(name)
        if ref is None:
            continue
        if s["volume_ml"] == 0:
            if ref["present"] >= settings.min_present:
                reasons.append(_reason("EMPTY", f"no {name} found, though {ref['present']:.0%} of the training cases have one", name))
            continue
        lo, hi = ref["volume_ml"] or (0.0, 0.0)
        m = settings.volume_margin
        if s["volume_ml"] < lo / (1 + m) or s["volume_ml"] > hi * (1 + m):
            reasons.append(_reason("VOLUME", f"{name} volume {s['volume_ml']:.3g} mL is outside the training range "
                                   f"{lo:.3g}–{hi:.3g} mL (with a {m:.0%} margin)", name))
        top = (ref["components"] or (0, 0))[1]
        if s["components"] > top + settings.components_margin:
            reasons.append(_reason("COMPONENTS", f"{name} has {s['components']} separate parts; training cases had at most {int(top)}", name))
        if settings.border and s["touches_border"] and ref["touches_border"] < settings.border_share:
            reasons.append(_reason("BORDER", f"{name} touches the edge of the scan (cut off?); it did in "
                                   f"{ref['touches_border']:.0%} of the training cases", name))
    if reference:
        for c, (got, ref) in enumerate(zip(percentiles, reference.get("intensity", []))):
            spread = max((ref["p99"][1] - ref["p01"][0]), 1e-6)
            widen = settings.intensity_margin * spread
            outside = [f"{key} {value:.4g} (training {ref[key][0]:.4g}–{ref[key][1]:.4g})"
                       for key, value in zip(("p01", "p50", "p99"), got)
                       if ref[key] and not (ref[key][0] - widen <= value <= ref[key][1] + widen)]
            if outside:
                channel = f"channel {c} " if len(percentiles) > 1 else ""
                reasons.append(_reason("INTENSITY", f"image {channel}intensities unlike the training scans (other modality, "
                                       f"protocol or scaling?): {', '.join(outside)}"))
        if reference.get("spacing_mm"):
            lo, hi = reference["spacing_mm"]
            f = settings.spacing_factor
            bad = [i for i, s in enumerate(spacing[:len(lo)]) if not (lo[i] / f <= s <= hi[i] * f)]
            if bad:
                reasons.append(_reason("SPACING", "voxel spacing " + " x ".join(f"{s:.3g}" for s in spacing) + " mm is far from "
                                       "the training range " + " x ".join(f"{a:.3g}–{b:.3g}" for a, b in zip(lo, hi)) + " mm"))
    plausibility = len(reasons)
    agreements = [(g, name, v) for g, per in signals.get("agreement", {}).items() for name, v in per.items()]
    for g, name, v in agreements:
        if v < settings.min_agreement:
            who = "ensemble members" if g == "ensemble" else "mirrored (TTA) predictions"
            reasons.append(_reason("AGREEMENT", f"the {who} disagree on {name}: mean pairwise Dice {v:.2f} "
                                   f"(review below {settings.min_agreement:.2f})", name))
    uncertainties = {name: v for name, v in signals.get("uncertainty", {}).items()
                     if v is not None and label_stats.get(name, {}).get("volume_ml", 0) > 0}
    for name, v in uncertainties.items():
        if v > settings.max_uncertainty:
            reasons.append(_reason("UNCERTAINTY", f"the model is unsure about {name}: mean entropy {v:.2f} in and around "
                                   f"it (review above {settings.max_uncertainty:.2f})", name))
    if agreements:
        base = min(v for _, _, v in agreements)
    else:
        base = 1.0 - max(uncertainties.values(), default=0.0)
    score = round(max(0.0, base) * 0.5 ** plausibility, 4)
    return {"verdict": "review" if reasons else "ok", "score": score, "reasons": reasons,
            "signals": {**signals, "volumes_ml": {n: s["volume_ml"] for n, s in label_stats.items()},
                        "components": {n: s["components"] for n, s in label_stats.items()},
                        "percentiles": percentiles, "reference": bool(reference)}}
