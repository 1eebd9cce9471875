"""Surface-distance metrics in millimetres: HD, HD95, ASSD and normalised surface Dice (NSD).

Definition (the boundary-voxel one used by MONAI and nnU-Net-style evaluations): a mask's surface is the set
of its voxels with a face-neighbour outside the mask (``mask XOR binary_erosion(mask)``, outside the image
counting as background). Distances are exact Euclidean distances, in mm using the voxel spacing, from each
surface voxel of one mask to the nearest surface voxel of the other (``scipy.ndimage.distance_transform_edt``
on the union bounding box, which holds every surface voxel).

* HD = max of both directed maxima; HD95 = max of both directed 95th percentiles (linear interpolation);
* ASSD = mean of all distances of both directions together;
* NSD(τ) = (surface voxels of both masks within τ mm of the other surface) / (all surface voxels of both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class SurfaceDistances:
    """Directed distances (mm) from the prediction surface to the reference surface and back."""

    pred_to_ref: np.ndarray
    ref_to_pred: np.ndarray


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crops both masks to their union's bounding box plus a one-voxel zero margin."""
    coords = np.nonzero(pred | ref)
    slices = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
    return np.pad(pred[slices], 1), np.pad(ref[slices], 1)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a boolean mask (face connectivity; outside the array counts as background)."""
    return mask ^ ndimage.binary_erosion(mask, border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> SurfaceDistances | None:
    """Directed surface distances between two non-empty masks; None if either is empty.

    Args:
        pred: Boolean mask ``(X, Y[, Z])``.
        ref: Boolean mask of the same shape.
        spacing: Voxel spacing in mm per axis.
    """
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not pred.any() or not ref.any():
        return None
    pred_c, ref_c = _crop_to_union(pred, ref)
    surf_pred, surf_ref = surface(pred_c), surface(ref_c)
    dist_to_ref = ndimage.distance_transform_edt(~surf_ref, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)
    return SurfaceDistances(dist_to_ref[surf_pred], dist_to_pred[surf_ref])


def hausdorff(d: SurfaceDistances, percentile: float = 100.0) -> float:
    """Symmetric (percentile) Hausdorff distance in mm."""
    if percentile >= 100:
        return float(max(d.pred_to_ref.max(), d.ref_to_pred.max()))
    return float(max(np.percentile(d.pred_to_ref, percentile), np.percentile(d.ref_to_pred, percentile)))


def assd(d: SurfaceDistances) -> float:
    """Average symmetric surface distance in mm."""
    return float(np.concatenate([d.pred_to_ref, d.ref_to_pred]).mean())


def nsd(d: SurfaceDistances, tolerance_mm: float) -> float:
    """Normalised surface Dice at tolerance ``tolerance_mm``, in [0, 1]."""
    within = int((d.pred_to_ref <= tolerance_mm).sum()) + int((d.ref_to_pred <= tolerance_mm).sum())
    return within / (d.pred_to_ref.size + d.ref_to_pred.size)
