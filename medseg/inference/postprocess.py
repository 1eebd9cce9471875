"""Post-processing of label maps from ``inference.postprocess``: largest connected component per label, removal
of components below a size in mm^3, hole filling. Works in place on the uint8/uint16 label map, one binary
mask of one label at a time (1 byte per voxel of extra memory).

Components use full connectivity (26 neighbours in 3D, 8 in 2D), like the lesion metrics' default, through
:func:`medseg.plan.statistics.label_components` (``connected-components-3d``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medseg.config import PostprocessConfig
from medseg.errors import ConfigError
from medseg.io.volume import Volume
from medseg.plan.statistics import label_components


def _ids(names: list[str] | dict[str, float], labels: dict[int, str]) -> dict[int, str]:
    by_name = {v: k for k, v in labels.items()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(
            "CONFIG_INVALID_VALUE", f"inference.postprocess names unknown label(s) {unknown}",
            f"labels of this model: {', '.join(v for k, v in sorted(labels.items()) if k)}",
        )
    return {by_name[n]: n for n in names}


def postprocess(labels: Volume, cfg: PostprocessConfig, names: dict[int, str]) -> tuple[Volume, dict[str, int]]:
    """Applies the configured clean-up to ``labels`` ``(1, *spatial)``.

    Returns:
        The cleaned label map (the same array, modified in place) and counts of what changed:
        ``{"removed_components": n, "removed_voxels": n, "filled_voxels": n}``.

    Raises:
        ConfigError: ``CONFIG_INVALID_VALUE`` for label names the model does not have.
    """
    data = labels.array[0]
    counts = {"removed_components": 0, "removed_voxels": 0, "filled_voxels": 0}
    voxel_mm3 = float(abs(np.linalg.det(labels.affine[: data.ndim, : data.ndim])))  # mm^2 per pixel in 2D
    largest = _ids(cfg.largest_component, names)
    per_label = {k: cfg.min_component_mm3_per_label[n] for k, n in _ids(cfg.min_component_mm3_per_label, names).items()}
    fill = _ids(cfg.fill_holes, names)
    for value in sorted(k for k in names if k > 0):
        min_mm3 = per_label.get(value, cfg.min_component_mm3)
        if value not in largest and min_mm3 <= 0 and value not in fill:
            continue
        mask = data == value
        if not mask.any():
            continue
        if value in largest or min_mm3 > 0:
            components, n = label_components(mask)
            if n:
                sizes = np.bincount(components.ravel())[1:]
                keep = np.ones(n, dtype=bool)
                if value in largest:
                    keep[:] = False
                    keep[int(np.argmax(sizes))] = True
                if min_mm3 > 0:
                    keep &= sizes * voxel_mm3 >= min_mm3
                drop = np.concatenate([[False], ~keep])[components]
                counts["removed_components"] += int((~keep).sum())
                counts["removed_voxels"] += int(drop.sum())
                data[drop] = 0
                mask &= ~drop
                del components, drop
        if value in fill:
            filled = ndimage.binary_fill_holes(mask)
            holes = filled & ~mask & (data == 0)  # only background inside the structure is filled
            counts["filled_voxels"] += int(holes.sum())
            data[holes] = value
    return labels, counts
