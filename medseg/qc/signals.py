"""QC signals accumulated while the sliding window stitches, slab by slab (no whole-volume float map).

* **Agreement** (Roy et al. 2019; the robust baseline of Zenk et al. 2025): for an ensemble, each member's
  blended probabilities give its own label map; for TTA, each flip's. Per label, the mean Dice over all pairs
  (two empty maps agree: Dice 1). Needs ``K`` more accumulator channels per member / flip and no extra forward pass.
* **Uncertainty**: the normalised entropy ``-sum p log p / log K`` of the final probabilities (after temperature
  scaling for a single model) per voxel, in [0, 1]. Per label it is averaged over the voxels *in and near* the
  predicted structure: predicted as the label, or given at least :data:`NEAR` probability of it. The mean over a
  region around the structure, rather than over the whole image (dominated by confident background) or the
  maximum (one noisy voxel), is the aggregation Jungo & Reyes (2019) and Zenk et al. (2025) found informative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

NEAR = 0.1  # a voxel with at least this probability of a label is "near" it
CHUNK_VOXELS = 1 << 21  # voxels per piece of a slab for the entropy sums (bounds the gathered copies)


@dataclass
class QcAccumulator:
    """Running sums for one case. ``groups`` maps a group name (``ensemble``, ``tta``) to its unit count; the
    network's extra output channels hold each unit's probabilities, group after group."""

    n_classes: int
    groups: dict[str, int] = field(default_factory=dict)
    entropy_sum: Any = None  # np.ndarray per label (index 0 unused), set in __post_init__
    entropy_count: Any = None
    sizes: dict[str, np.ndarray] = field(default_factory=dict)  # group -> (units, K)
    inter: dict[str, np.ndarray] = field(default_factory=dict)  # group -> (units, units, K)
    model_labels: np.ndarray | None = None  # the label map on the network's grid, when it is one grid

    def __post_init__(self) -> None:
        k = self.n_classes
        self.entropy_sum = np.zeros(k)
        self.entropy_count = np.zeros(k, dtype=np.int64)
        for g, n in self.groups.items():
            self.sizes[g] = np.zeros((n, k), dtype=np.int64)
            self.inter[g] = np.zeros((n, n, k), dtype=np.int64)

    @property
    def extra_channels(self) -> int:
        return self.n_classes * sum(self.groups.values())

    def add(self, scores: torch.Tensor, labels: torch.Tensor, extra: torch.Tensor | None, *,
            temperature: float | None = None, entropy_map: bool = False) -> torch.Tensor | None:
        """Adds one slab: ``scores (K, ...)`` the final probabilities, or logits when ``temperature`` is given
        (the probabilities are ``softmax(scores / temperature)``), ``labels`` their argmax, ``extra`` the units'
        probabilities.

        The per-label sums need the entropy only in and near a predicted structure, so unless ``entropy_map`` is
        asked for, it is computed only on the voxels that can be in some label's region: predicted as foreground,
        or with a foreground probability that may reach :data:`NEAR` — from logits through the bound
        ``p_l <= sigmoid((s_l - s_0) / T)``, so the softmax too runs only there. Those are a small share of a CT;
        the sums are those of the whole-slab computation.

        Returns:
            With ``entropy_map``, the slab's normalised entropy (float32, same device); else ``None``.
        """
        k = self.n_classes
        values = scores.float()
        entropy: torch.Tensor | None = None
        if entropy_map:
            p = torch.softmax(values / temperature, dim=0) if temperature is not None else values
            entropy = _entropy(p, k)
            self._add_entropy(labels, p, entropy)
        else:  # a few planes at a time: the gathered voxels and their indices stay small whatever the slab
            step = max(1, CHUNK_VOXELS // max(1, math.prod(values.shape[1:-1])))
            for z in range(0, values.shape[-1], step):
                part, lab_part = values[..., z : z + step], labels[..., z : z + step]
                if temperature is None:
                    candidates = part[1:].amax(0) >= NEAR
                else:
                    margin = math.log(NEAR / (1 - NEAR)) - 1e-4  # the bound, with room for rounding
                    candidates = (part[1:].amax(0) - part[0]) / temperature >= margin
                candidates |= lab_part != 0
                p_sel = part[:, candidates]
                if temperature is not None:
                    p_sel = torch.softmax(p_sel / temperature, dim=0)
                self._add_entropy(lab_part[candidates], p_sel, _entropy(p_sel, k))
        offset = 0
        for g, n in self.groups.items():
            assert extra is not None  # groups need the units' channels
            maps = [extra[offset + u * k: offset + (u + 1) * k].argmax(0) for u in range(n)]
            offset += n * k
            for lab in range(1, k):
                masks = [m == lab for m in maps]
                for u in range(n):
                    self.sizes[g][u, lab] += int(masks[u].sum())
                    for v in range(u + 1, n):
                        self.inter[g][u, v, lab] += int((masks[u] & masks[v]).sum())
        return entropy

    def _add_entropy(self, labels: torch.Tensor, p: torch.Tensor, entropy: torch.Tensor) -> None:
        for lab in range(1, self.n_classes):
            region = (labels == lab) | (p[lab] >= NEAR)
            self.entropy_sum[lab] += float(torch.where(region, entropy, 0.0).sum())
            self.entropy_count[lab] += int(region.sum())

    def merge(self, other: QcAccumulator) -> None:
        self.entropy_sum += other.entropy_sum
        self.entropy_count += other.entropy_count
        for g in self.groups:
            self.sizes[g] += other.sizes[g]
            self.inter[g] += other.inter[g]

    def result(self, names: dict[int, str]) -> dict:
        """``{"uncertainty": {label: mean or None}, "agreement": {group: {label: mean pairwise Dice}}}``."""
        out: dict = {"uncertainty": {}, "agreement": {}}
        for lab, name in sorted(names.items()):
            if lab:
                n = int(self.entropy_count[lab])
                out["uncertainty"][name] = round(float(self.entropy_sum[lab] / n), 4) if n else None
        for g in self.groups:
            out["agreement"][g] = {name: round(pairwise_dice(self.sizes[g][:, lab], self.inter[g][:, :, lab]), 4)
                                   for lab, name in sorted(names.items()) if lab}
        return out


def pairwise_dice(sizes: np.ndarray, inter: np.ndarray) -> float:
    """Mean Dice over all unit pairs from per-unit sizes and the upper triangle of intersections."""
    scores = []
    for u in range(len(sizes)):
        for v in range(u + 1, len(sizes)):
            total = sizes[u] + sizes[v]
            scores.append(1.0 if total == 0 else 2.0 * inter[u, v] / total)
    return float(np.mean(scores)) if scores else 1.0


def _entropy(p: torch.Tensor, k: int) -> torch.Tensor:
    """Normalised entropy ``-sum p log p / log K`` over the first axis."""
    return -(p * torch.log(p.clamp_min(1e-7))).sum(0) / math.log(k)
