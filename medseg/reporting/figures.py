"""Summary figures of an evaluation (matplotlib), returned as PNG bytes."""

from __future__ import annotations

import io

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from medseg.metrics.catalogue import METRICS
from medseg.reporting.overlays import PRED_COLOUR, REF_COLOUR

DISTRIBUTION_METRICS = tuple(m for m in METRICS.values() if m.distribution)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _column(rows: list[dict], label: str, key: str) -> np.ndarray:
    return np.array([float(r[key]) for r in rows if r["label"] == label], dtype=float)


def distributions(rows: list[dict], labels: list[str]) -> bytes:
    """Box plots with the individual cases as points, one panel per metric, one box per label."""
    fig, axes = plt.subplots(1, len(DISTRIBUTION_METRICS), figsize=(3.0 * len(DISTRIBUTION_METRICS), 3.2))
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes, DISTRIBUTION_METRICS):
        key, title = metric.name, metric.title
        data = [_column(rows, lab, key) for lab in labels]
        data = [d[np.isfinite(d)] for d in data]
        ax.boxplot([d if d.size else [np.nan] for d in data], tick_labels=labels, showfliers=False, widths=0.5)
        for i, d in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, d.size), d, s=10, color=REF_COLOUR, alpha=0.7, zorder=3)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        if metric.bounded:
            ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    return _png(fig)


def volume_agreement(rows: list[dict], label: str, unit: str) -> bytes:
    """Bland-Altman plot of volumes, predicted vs reference volume, and Dice vs reference volume."""
    ref, pred, dice = (_column(rows, label, k) for k in ("vol_ref_ml", "vol_pred_ml", "dice"))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(11, 3.3))
    mean, diff = (ref + pred) / 2, pred - ref
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if diff.size > 1 else 0.0
    ax1.scatter(mean, diff, s=14, color=REF_COLOUR)
    ax1.axhline(bias, color="k", lw=1, label=f"bias {bias:+.2f}")
    for limit in (bias - 1.96 * sd, bias + 1.96 * sd):
        ax1.axhline(limit, color="k", lw=0.8, ls="--")
    ax1.set(xlabel=f"mean volume ({unit})", ylabel=f"predicted − reference ({unit})", title="Bland–Altman")
    ax1.legend(fontsize=7, loc="best")
    top = float(max(ref.max(initial=0), pred.max(initial=0))) * 1.05 or 1.0
    ax2.plot([0, top], [0, top], color="k", lw=0.8, ls="--")
    ax2.scatter(ref, pred, s=14, color=PRED_COLOUR)
    ax2.set(xlabel=f"reference ({unit})", ylabel=f"predicted ({unit})", title="Volumes", xlim=(0, top), ylim=(0, top))
    ok = ref > 0
    ax3.scatter(ref[ok], dice[ok], s=14, color=REF_COLOUR)
    if ok.any() and ref[ok].max() / max(ref[ok].min(), 1e-9) > 20:
        ax3.set_xscale("log")
        ax3.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax3.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax3.set(xlabel=f"reference volume ({unit})", ylabel="Dice", title="Dice vs size", ylim=(-0.02, 1.02))
    for ax in (ax1, ax2, ax3):
        ax.title.set_fontsize(9)
        ax.tick_params(labelsize=8)
    fig.suptitle(label, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def qc_against_dice(rows: list[dict], qc: dict[str, dict], labels: list[str]) -> bytes:
    """The reference-free QC score of each case (``medseg predict``) against its true mean Dice over the labels,
    with the verdict as the marker and Spearman's rho in the title."""
    from scipy.stats import spearmanr

    points = []
    for case, record in sorted(qc.items()):
        dice = [float(r["dice"]) for r in rows if r["case"] == case and r["label"] in labels]
        dice = [d for d in dice if np.isfinite(d)]
        if dice:
            points.append((record["score"], float(np.mean(dice)), record["verdict"]))
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for verdict, marker, colour in (("ok", "o", REF_COLOUR), ("review", "x", PRED_COLOUR)):
        chosen = [p for p in points if p[2] == verdict]
        ax.scatter([p[0] for p in chosen], [p[1] for p in chosen], marker=marker, color=colour, label=verdict, s=28)
    rho = spearmanr([p[0] for p in points], [p[1] for p in points]).statistic if len(points) > 2 else float("nan")
    ax.set(xlabel="QC score (no reference)", ylabel="mean Dice (against the reference)", xlim=(-0.03, 1.03), ylim=(-0.03, 1.03))
    ax.set_title(f"QC score vs Dice, {len(points)} cases, Spearman rho {rho:.2f}" if np.isfinite(rho)
                 else f"QC score vs Dice, {len(points)} cases", fontsize=9)
    ax.legend(fontsize=8, title="verdict", title_fontsize=8)
    fig.tight_layout()
    return _png(fig)
