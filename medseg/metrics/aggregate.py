"""Summaries over cases: mean, median, IQR and percentile-bootstrap confidence intervals of the mean."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean: resample cases with replacement ``n_boot`` times.

    Args:
        values: Finite per-case values ``(N,)``.
        n_boot: Number of resamples.
        level: Confidence level, e.g. 0.95.
        seed: Seed of the resampling (the same inputs always give the same interval).

    Returns:
        ``(low, high)``; both equal the value when N == 1.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)  # (n_boot,)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def summarize(values: list[float], n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """``n`` (finite values), ``n_undefined`` (NaN), mean, median, q1, q3, iqr, min, max and ``ci_low``/``ci_high``."""
    arr = np.asarray(values, dtype=float)
    finite = arr[np.isfinite(arr)]
    out: dict = {"n": int(finite.size), "n_undefined": int(arr.size - finite.size)}
    if finite.size == 0:
        return out | dict.fromkeys(["mean", "median", "q1", "q3", "iqr", "min", "max", "ci_low", "ci_high"])
    q1, q3 = np.percentile(finite, [25, 75])
    low, high = bootstrap_ci(finite, n_boot, level, seed)
    return out | {
        "mean": float(finite.mean()),
        "median": float(np.median(finite)),
        "q1": float(q1),
        "q3": float(q3),
        "iqr": float(q3 - q1),
        "min": float(finite.min()),
        "max": float(finite.max()),
        "ci_low": low,
        "ci_high": high,
    }


def subgroups(
    rows: list[dict],
    case_meta: dict[str, dict[str, str]],
    labels: list[str],
    metric: str = "dice",
    small_n: int = 10,
    n_boot: int = 1000,
    level: float = 0.95,
) -> list[dict]:
    """Per metadata column and value: number of cases and the metric's mean and CI per label.

    Args:
        rows: Per case x label rows (``case``, ``label`` and ``metric`` keys).
        case_meta: ``{case: {column: value}}``; cases without a value for a column are left out of it.
        labels: Label names to report.
        metric: The row key to summarise.
        small_n: Subgroups with fewer cases are marked ``small``.

    Returns:
        One entry per (column, value): ``{column, value, n, small, labels: {name: summarize(...)}}``.
    """
    columns = sorted({col for meta in case_meta.values() for col in meta})
    out = []
    for column in columns:
        values = sorted({meta[column] for meta in case_meta.values() if meta.get(column) not in (None, "")})
        for value in values:
            cases = {c for c, meta in case_meta.items() if meta.get(column) == value}
            per_label = {
                name: summarize([float(r[metric]) for r in rows if r["case"] in cases and r["label"] == name], n_boot, level)
                for name in labels
            }
            out.append({"column": column, "value": value, "n": len(cases), "small": len(cases) < small_n, "labels": per_label})
    return out
