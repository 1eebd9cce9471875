"""Overlay figures: reference and prediction contours on the image, as PNG bytes.

3D cases get axial, coronal and sagittal slices through the structure's centre in radiological convention
(patient right on the image left, anterior/superior up); 2D cases one panel as the picture is stored.
Reference contours are Okabe-Ito blue, predictions orange (colour-blind safe); labels differ by line style.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy import ndimage

from medseg.io.orientation import radiological_planes, ras_spacing, to_ras

REF_COLOUR, PRED_COLOUR = "#0072B2", "#E69F00"
LINESTYLES = ("solid", "dashed", "dotted", "dashdot")


def _window(image: np.ndarray, near: np.ndarray) -> tuple[float, float]:
    values = image[near] if near.any() else image
    low, high = np.percentile(values, [1, 99])
    return float(low), float(max(high, low + 1e-6))


def _draw(ax, background: np.ndarray, ref: np.ndarray, pred: np.ndarray, labels: dict[int, str], window, aspect) -> None:
    if background.ndim == 3:
        ax.imshow(background, aspect=aspect)
    else:
        ax.imshow(background, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect)
    for i, value in enumerate(sorted(labels)):
        for arr, colour in ((ref, REF_COLOUR), (pred, PRED_COLOUR)):
            mask = arr == value
            if mask.any() and not mask.all():
                ax.contour(mask.astype(float), levels=[0.5], colors=colour, linestyles=LINESTYLES[i % 4], linewidths=1.1)
    ax.set_axis_off()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def overlay_3d(
    image: np.ndarray | None,
    ref: np.ndarray,
    pred: np.ndarray,
    affine: np.ndarray,
    labels: dict[int, str],
    window: tuple[float, float] | None = None,
) -> tuple[bytes, str]:
    """Axial, coronal and sagittal slices through the centre of the reference (else prediction).

    Args:
        image: ``(X, Y, Z)`` intensities, or None to draw contours on black.
        ref, pred: ``(X, Y, Z)`` label maps on the image grid.
        affine: Their voxel-to-RAS affine.
        labels: ``{value: name}`` of the foreground labels.
        window: Display window; default: 1st-99th percentile around the structure.

    Returns:
        ``(png, caption)``; the caption names the slices and the window.
    """
    ref_c, pred_c = to_ras(ref[None], affine)[0][0], to_ras(pred[None], affine)[0][0]
    spacing = ras_spacing(affine)
    img_c = to_ras(image[None], affine)[0][0] if image is not None else np.zeros(ref_c.shape, np.float32)
    focus = ref_c > 0 if (ref_c > 0).any() else pred_c > 0
    centre = (
        [int(round(c)) for c in ndimage.center_of_mass(focus)] if focus.any() else [s // 2 for s in ref_c.shape]
    )
    if window is None:
        window = _window(img_c, ndimage.binary_dilation(focus, iterations=10)) if image is not None else (0.0, 1.0)
    x, y, z = centre
    fig, axes = plt.subplots(1, 3, figsize=(8.4, 3.0))
    planes = [radiological_planes(a, (x, y, z), spacing) for a in (img_c, ref_c, pred_c)]
    for ax, (img_p, ref_p, pred_p) in zip(axes, zip(*planes)):
        _draw(ax, img_p[1], ref_p[1], pred_p[1], labels, window, img_p[2])
        ax.set_title(img_p[0], fontsize=8)
    fig.tight_layout(pad=0.8)
    caption = f"slices x={x + 1}, y={y + 1}, z={z + 1} (RAS voxel grid); window [{window[0]:.0f}, {window[1]:.0f}]"
    return _png(fig), caption


def overlay_2d(image: np.ndarray | None, ref: np.ndarray, pred: np.ndarray, labels: dict[int, str]) -> tuple[bytes, str]:
    """One panel for a 2D case. ``image`` is ``(C, X, Y)`` grey or RGB; ``ref``/``pred`` are ``(X, Y)``."""
    if image is None:
        background, window = np.zeros(ref.shape, np.float32), (0.0, 1.0)
    elif image.shape[0] == 3:
        background, window = np.moveaxis(image, 0, -1).astype(np.uint8), None
    else:
        background = image[0].astype(np.float32)
        window = _window(background, np.ones_like(ref, dtype=bool))
    fig, ax = plt.subplots(figsize=(3.0, 3.0))
    _draw(ax, background, ref, pred, labels, window, 1.0)
    fig.tight_layout(pad=0.2)
    caption = "as stored" if window is None else f"window [{window[0]:.0f}, {window[1]:.0f}]"
    return _png(fig), caption
