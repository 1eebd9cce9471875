import math

import numpy as np
import pytest

from medseg.metrics.aggregate import bootstrap_ci, summarize


def test_bootstrap_ci_brackets_the_mean_and_matches_normal_theory():
    rng = np.random.default_rng(0)
    values = rng.normal(0.8, 0.05, size=200)
    low, high = bootstrap_ci(values, n_boot=4000, seed=1)
    se = values.std(ddof=1) / math.sqrt(values.size)
    assert low < values.mean() < high
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_bootstrap_ci_is_deterministic_and_degenerate_for_one_case():
    values = np.array([0.5, 0.7, 0.9])
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(np.array([0.4])) == (0.4, 0.4)


def test_summarize_counts_undefined_values():
    s = summarize([0.2, float("nan"), 0.4, 0.6, 0.8])
    assert s["n"] == 4 and s["n_undefined"] == 1
    assert s["mean"] == pytest.approx(0.5) and s["median"] == pytest.approx(0.5)
    assert s["q1"] == pytest.approx(0.35) and s["iqr"] == pytest.approx(0.3)
    assert s["ci_low"] <= s["mean"] <= s["ci_high"]
    assert summarize([float("nan")])["mean"] is None
