"""CLAHE (contrast-limited adaptive histogram equalisation) as a MONAI-style transform, 2D and 3D.

Built on :func:`skimage.exposure.equalize_adapthist`. Works on any intensity range: each channel (or the RGB
image as a whole) is rescaled from its own [min, max] to [0, 1], equalised, and mapped back to [min, max], so
CT in HU stays in HU. Integer inputs are rounded back to their dtype; float inputs keep theirs. Deterministic.

* ``(C, X, Y)`` with C == 3 and ``rgb=True``: colour photo; scikit-image equalises the luminance (the V channel of
  HSV) and keeps the hue.
* otherwise: every channel separately, 2D ``(C, X, Y)`` or 3D ``(C, X, Y, Z)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils.enums import TransformBackends
from monai.utils.type_conversion import convert_to_dst_type
from skimage.exposure import equalize_adapthist


def _equalize(arr: np.ndarray, kernel_size, clip_limit: float, nbins: int, rgb: bool) -> np.ndarray:
    """Equalises one grey image/volume, or one ``(X, Y, 3)`` colour image when ``rgb``."""
    low, high = float(arr.min()), float(arr.max())
    if high <= low:
        return arr.astype(np.float64)
    unit = (arr.astype(np.float64) - low) / (high - low)
    # scikit-image treats any 3D array whose last axis has 3 or 4 entries as colour: move a longer axis last
    roll = 0
    if not rgb and unit.ndim == 3 and unit.shape[-1] in (3, 4):
        roll = 1
        unit = np.moveaxis(unit, -1, 0)
        if kernel_size is not None and not isinstance(kernel_size, int):
            kernel_size = (kernel_size[-1], *kernel_size[:-1])
    out = equalize_adapthist(unit, kernel_size=kernel_size, clip_limit=clip_limit, nbins=nbins)
    if roll:
        out = np.moveaxis(out, 0, -1)
    return out * (high - low) + low


class CLAHE(Transform):
    """Array transform on channel-first images.

    Args:
        kernel_size: Tile size in voxels (int or one per spatial axis); None = 1/8 of each axis.
        clip_limit: Contrast limit in (0, 1]; higher gives more contrast.
        nbins: Histogram bins.
        rgb: Treat 3-channel 2D images as colour photos (equalise luminance) rather than 3 separate channels.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self, kernel_size: int | Sequence[int] | None = None, clip_limit: float = 0.01, nbins: int = 256, rgb: bool = True
    ) -> None:
        if not 0 < clip_limit <= 1:
            raise ValueError(f"clip_limit must be in (0, 1], got {clip_limit}")
        self.kernel_size, self.clip_limit, self.nbins, self.rgb = kernel_size, clip_limit, nbins, rgb

    def __call__(self, img: Any) -> Any:
        """``img``: ``(C, X, Y)`` or ``(C, X, Y, Z)`` tensor or array; returns the same type, shape and dtype."""
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        if arr.ndim not in (3, 4):
            raise ValueError(f"CLAHE expects (C, X, Y) or (C, X, Y, Z), got shape {arr.shape}")
        if self.rgb and arr.ndim == 3 and arr.shape[0] == 3:
            out = np.moveaxis(_equalize(np.moveaxis(arr, 0, -1), self.kernel_size, self.clip_limit, self.nbins, True), -1, 0)
        else:
            out = np.stack([_equalize(ch, self.kernel_size, self.clip_limit, self.nbins, False) for ch in arr])
        if np.issubdtype(arr.dtype, np.integer):
            out = np.clip(np.round(out), arr.min(), arr.max())
        out = out.astype(arr.dtype)
        return convert_to_dst_type(out, img)[0] if isinstance(img, torch.Tensor) else out


class CLAHEd(MapTransform):
    """Dictionary form of :class:`CLAHE`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        self.clahe = CLAHE(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.clahe(d[key])
        return d
