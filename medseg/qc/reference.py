"""What a model folder keeps for QC (``model.json["qc"]``): ranges over the training cases and the softmax
temperature fitted on the validation cases. Aggregates only: no case, case ID or path of the training data.

The reference is made from the dataset fingerprint (:mod:`medseg.plan.fingerprint`), which measures each
training case with :mod:`medseg.plan.statistics` in the same read that validates it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

TEMPERATURES = np.round(np.exp(np.linspace(math.log(0.25), math.log(8.0), 41)), 4)  # grid searched for T
VOXELS_PER_CASE = 100_000  # validation voxels per case used to fit the temperature (fixed-seed sample)


def _span(values: list[float]) -> list[float] | None:
    return [float(min(values)), float(max(values))] if values else None


def qc_reference(fingerprint) -> dict:
    """Ranges over the training cases: per label (by name) how often it is present, its volume (mL) and
    component-count range where present and how often it touches the field-of-view border; per RAS axis the
    spacing range; per channel the range of the images' 1st/50th/99th intensity percentiles."""
    cases = fingerprint.cases
    labels = {}
    for key, name in fingerprint.labels.items():
        if key == "0":
            continue
        stats = [c["labels"][key] for c in cases if key in c["labels"]]
        present = [s for s in stats if s["volume_ml"] > 0]
        labels[name] = {
            "present": round(len(present) / max(len(stats), 1), 4),
            "volume_ml": _span([s["volume_ml"] for s in present]),
            "components": _span([s["components"] for s in present]),
            "touches_border": round(sum(s["touches_border"] for s in present) / max(len(present), 1), 4),
        }
    spacings = np.asarray(fingerprint.spacings, dtype=float)
    intensity = []
    for c in range(fingerprint.channels):
        per = np.asarray([case["percentiles"][c] for case in cases], dtype=float).reshape(-1, 3)
        intensity.append({name: _span(per[:, i].tolist()) for i, name in enumerate(("p01", "p50", "p99"))})
    return {
        "n_cases": len(cases),
        "labels": labels,
        "spacing_mm": [spacings.min(axis=0).round(6).tolist(), spacings.max(axis=0).round(6).tolist()] if spacings.size else None,
        "intensity": intensity,
    }


def fit_temperature(logits: list[torch.Tensor], references: list[np.ndarray], seed: int = 0) -> dict:
    """Temperature scaling (Guo et al. 2017): the ``T`` of ``softmax(logits / T)`` with the lowest negative
    log-likelihood of the reference labels, searched on a log grid from 0.25 to 8 over at most
    :data:`VOXELS_PER_CASE` voxels per case (uniform, fixed seed). ``T > 1`` softens overconfident outputs.

    Args:
        logits: Per case the blended logits ``(K, *spatial)`` on the preprocessed grid.
        references: Per case the reference labels on the same grid.

    Returns:
        ``{"temperature", "nll_before", "nll_after", "voxels"}``.
    """
    rng = np.random.default_rng(seed)
    picked_logits, picked_refs = [], []
    for z, ref in zip(logits, references):
        flat = z.reshape(z.shape[0], -1).float()
        r = torch.as_tensor(np.asarray(ref).reshape(-1).astype(np.int64))
        index = torch.as_tensor(rng.choice(r.numel(), size=min(VOXELS_PER_CASE, r.numel()), replace=False))
        picked_logits.append(flat[:, index])
        picked_refs.append(r[index])
    z = torch.cat(picked_logits, dim=1).T  # (N, K)
    r = torch.cat(picked_refs)
    nll = [float(torch.nn.functional.cross_entropy(z / float(t), r)) for t in TEMPERATURES]
    best = int(np.argmin(nll))
    return {"temperature": float(TEMPERATURES[best]), "nll_before": round(float(torch.nn.functional.cross_entropy(z, r)), 5),
            "nll_after": round(nll[best], 5), "voxels": int(r.numel())}
