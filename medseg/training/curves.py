"""The training curves figure (``RUN/training_curves.png``)."""

from __future__ import annotations

from pathlib import Path


def save_curves(history: list[dict], path: Path) -> None:
    """Training loss and validation Dice per label against epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot([h["epoch"] for h in history], [h["train_loss"] for h in history])
    ax1.set(xlabel="epoch", ylabel="train loss")
    val = [h for h in history if "val_dice_mean" in h]
    for key in sorted({k for h in val for k in h if k.startswith("val_dice_")}):
        ax2.plot([h["epoch"] for h in val], [h[key] for h in val], marker="o", label=key.removeprefix("val_dice_"))
    ax2.set(xlabel="epoch", ylabel="validation Dice", ylim=(0, 1))
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
