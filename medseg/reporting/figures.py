"""Figures for the report, returned as PNG bytes (embedded in the HTML as base64)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

REF_COLOUR, PRED_COLOUR = "#0072B2", "#E69F00"  # Okabe-Ito blue / orange: colour-blind safe
LINESTYLES = ("solid", "dashed", "dotted", "dashdot")


def to_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorders/flips the axes of a ``(X, Y, Z)`` array to RAS+ (closest canonical orientation)."""
    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(array, ornt)


def display_window(image: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    """Display window: the 1st-99th percentile of the intensities in ``region`` (around the structure)."""
    values = image[region] if region.any() else image
    low, high = np.percentile(values, [1, 99])
    return float(low), float(max(high, low + 1e-6))


def axial_overlay_png(
    image: np.ndarray | None,
    ref: np.ndarray,
    pred: np.ndarray,
    affine: np.ndarray,
    labels: dict[int, str],
    window: tuple[float, float] | None = None,
) -> tuple[bytes, str]:
    """Axial slice through the largest reference area (else prediction), radiological convention.

    Args:
        image: ``(X, Y, Z)`` intensities, or None to draw contours on black.
        ref: ``(X, Y, Z)`` reference labels.
        pred: ``(X, Y, Z)`` predicted labels.
        affine: Voxel-to-RAS affine shared by the three arrays.
        labels: ``{value: name}`` of the foreground labels to draw.
        window: Display window (e.g. a CT window in HU); default: percentiles around the structure.

    Returns:
        ``(png bytes, caption)``; the caption states the slice and the display window.
    """
    ref_c, pred_c = to_canonical(ref, affine), to_canonical(pred, affine)
    img_c = to_canonical(image, affine) if image is not None else np.zeros(ref_c.shape, dtype=np.float32)
    area = (ref_c > 0).sum(axis=(0, 1))
    if area.max() == 0:
        area = (pred_c > 0).sum(axis=(0, 1))
    z = int(np.argmax(area)) if area.max() > 0 else ref_c.shape[2] // 2
    if image is None:
        low, high = 0.0, 1.0
    elif window is not None:
        low, high = window
    else:
        from scipy import ndimage

        near = ndimage.binary_dilation((ref_c[:, :, z] > 0) | (pred_c[:, :, z] > 0), iterations=15)
        low, high = display_window(img_c[:, :, z], near)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ornt = nib.orientations.io_orientation(affine)
    sx, sy = spacing[int(np.argwhere(ornt[:, 0] == 0)[0, 0])], spacing[int(np.argwhere(ornt[:, 0] == 1)[0, 0])]

    def show(a: np.ndarray) -> np.ndarray:  # RAS (x, y) -> screen: patient right on the left, anterior up
        return a[::-1, :].T

    fig, ax = plt.subplots(figsize=(3.6, 3.6))
    ax.imshow(show(img_c[:, :, z]), cmap="gray", vmin=low, vmax=high, origin="lower", aspect=sy / sx)
    for i, (value, name) in enumerate(sorted(labels.items())):
        style = LINESTYLES[i % len(LINESTYLES)]
        for arr, colour in ((ref_c, REF_COLOUR), (pred_c, PRED_COLOUR)):
            mask = show((arr[:, :, z] == value).astype(float))
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=colour, linestyles=style, linewidths=1.2, origin="lower")
    ax.set_axis_off()
    fig.tight_layout(pad=0.1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    caption = f"axial slice {z + 1}/{ref_c.shape[2]}; window [{low:.0f}, {high:.0f}]"
    return buf.getvalue(), caption
