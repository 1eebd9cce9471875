"""Dataset fingerprint: what the planner needs to know about a dataset, measured once, stored as JSON.

Spacings and shapes are given per axis of the RAS-reoriented grid (the grid training works on). Intensity
statistics are over foreground voxels (label > 0), from at most ``samples_per_case`` voxels per case drawn with
a fixed seed, as nnU-Net does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medseg.fsutil import json_hash, write_text
from medseg.io.dataset import Dataset
from medseg.io.orientation import ras_order
from medseg.io.validate import check_case, refuse


class JsonRecord:
    """JSON round trip and a short content hash for the fingerprint and plan dataclasses."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)  # type: ignore[call-overload]  # the subclasses are dataclasses

    @classmethod
    def from_json(cls, text: str):
        return cls(**json.loads(text))

    def hash(self) -> str:
        """Short SHA-256 of the canonical JSON."""
        return json_hash(asdict(self))  # type: ignore[call-overload]


@dataclass
class Fingerprint(JsonRecord):
    """Measured properties of a dataset's training cases."""

    dataset: str
    modality: dict[str, str]
    labels: dict[str, str]
    dims: int
    channels: int
    spacings: list[list[float]]  # per case, (X, Y[, Z]) in RAS order, mm
    shapes: list[list[int]]  # per case, voxels in RAS order
    intensity: list[dict[str, float]]  # per channel: clip_low, clip_high, mean, std, min, max (foreground)
    class_frequency: dict[str, float]  # share of all voxels per label
    # per case, no case ID: image percentiles and label volumes/components/border contact (medseg.plan.statistics),
    # from which the model folder's QC reference is made
    cases: list[dict] = field(default_factory=list)
    # the foreground percentiles clip_low/clip_high were taken at (config plan.ct_clip_percentiles)
    clip_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])


def compute_fingerprint(
    dataset: Dataset,
    samples_per_case: int = 10_000,
    seed: int = 0,
    clip_percentiles: tuple[float, float] | list[float] = (0.5, 99.5),
) -> Fingerprint:
    """Measures the training cases of ``dataset``, checking each one as ``medseg validate`` does in the same read
    (files readable, no NaN/Inf, channel count, image and label on one grid, label values declared).

    Args:
        dataset: A discovered dataset.
        samples_per_case: Foreground voxels sampled per case for the intensity statistics.
        seed: Seed of that sampling.
        clip_percentiles: Foreground percentiles CT images are clipped at (``plan.ct_clip_percentiles``).

    Raises:
        DatasetError / InputError: the first failing check's code (``LABEL_VALUES_UNEXPECTED``,
            ``IMAGE_LABEL_MISMATCH``, ``NIFTI_NONFINITE``, ``CHANNELS_MISMATCH`` ...), naming every failing case.
    """

    from medseg.plan.statistics import image_percentiles, label_stats

    low_pct, high_pct = clip_percentiles
    rng = np.random.default_rng(seed)
    spacings, shapes, samples, case_stats = [], [], [], []
    fg_ids = sorted(k for k in dataset.labels if k != 0)
    counts: dict[int, int] = {}
    total = 0
    dims = channels = 0
    problems = []
    for case in dataset.training:
        image, label, found = check_case(case, dataset, with_label=True)
        if found or image is None or label is None:
            problems.extend(found)
            continue
        dims, channels = len(image.spatial_shape), image.array.shape[0]
        order = ras_order(image.affine, dims)
        spacings.append([round(float(image.spacing[i]), 6) for i in order])
        shapes.append([int(image.spatial_shape[i]) for i in order])
        lab = label.array[0]
        values, n = np.unique(lab, return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            counts[int(v)] = counts.get(int(v), 0) + int(c)
        total += lab.size
        fg = np.flatnonzero(lab > 0)
        pick = rng.choice(fg, size=min(samples_per_case, fg.size), replace=False) if fg.size else fg
        samples.append(image.array.reshape(channels, -1)[:, pick].astype(np.float64))  # (C, n)
        per_label = label_stats(np.asarray(lab).astype(np.uint16, copy=False), label.unit_volume_ml, fg_ids)
        case_stats.append({"percentiles": image_percentiles(image.array),
                           "labels": {str(k): v for k, v in per_label.items()}})
    refuse(problems, "training")
    pooled = np.concatenate(samples, axis=1) if samples else np.zeros((channels, 0))
    intensity = []
    for c in range(channels):
        v = pooled[c]
        if v.size == 0:
            intensity.append(dict.fromkeys(["clip_low", "clip_high", "mean", "std", "min", "max"], 0.0))
            continue
        intensity.append(
            {
                "clip_low": float(np.percentile(v, low_pct)),  # plan.ct_clip_percentiles of the foreground
                "clip_high": float(np.percentile(v, high_pct)),
                "mean": float(v.mean()),
                "std": float(v.std()),
                "min": float(v.min()),
                "max": float(v.max()),
            }
        )
    return Fingerprint(
        dataset=dataset.name,
        modality=dataset.modality,
        labels={str(k): v for k, v in dataset.labels.items()},
        dims=dims,
        channels=channels,
        spacings=spacings,
        shapes=shapes,
        intensity=intensity,
        class_frequency={str(k): counts.get(k, 0) / max(total, 1) for k in sorted(dataset.labels)},
        cases=case_stats,
        clip_percentiles=[float(low_pct), float(high_pct)],
    )


def load_or_compute(
    dataset: Dataset, path: Path, clip_percentiles: tuple[float, float] | list[float] = (0.5, 99.5)
) -> Fingerprint:
    """Reads ``path`` if it exists and describes this dataset measured at ``clip_percentiles``, else computes and
    writes it."""
    wanted = [float(p) for p in clip_percentiles]
    if path.is_file():
        fp = Fingerprint.from_json(path.read_text())
        if (
            fp.dataset == dataset.name
            and len(fp.shapes) == len(dataset.training)
            and len(fp.cases) == len(fp.shapes)
            and fp.clip_percentiles == wanted
        ):
            return fp
    fp = compute_fingerprint(dataset, clip_percentiles=wanted)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, fp.to_json())
    return fp
