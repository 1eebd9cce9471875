"""Orientation, in one place: reorienting arrays to RAS+ (the grid training and prediction work on) and the
radiological views figures show (patient right on the image's left, anterior and superior up).

Reorientation is an axis permutation and flips (a numpy view, no copy), as nibabel's ``io_orientation`` finds the
closest RAS axes and MONAI's ``Orientation`` applies them; the report's overlays and the prediction previews cut
the same three planes through the same reoriented grid.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorients a channel-first array ``(C, *spatial)`` to the closest RAS axes: a numpy view (flips and an
    axis permutation), and the matching affine.

    2D arrays (``(C, X, Y)`` with a 4x4 affine whose first two columns are in-plane) are reoriented in-plane.

    Examples:
        >>> flipped = np.diag([-2.0, 1.0, 3.0, 1.0])  # x runs right-to-left
        >>> view, affine = to_ras(np.arange(8).reshape(1, 2, 2, 2), flipped)
        >>> view[0, :, 0, 0].tolist(), float(affine[0, 0])
        ([4, 0], 2.0)
    """
    ndim = array.ndim - 1
    sub = affine if ndim == 3 else affine[np.ix_([0, 1, 3], [0, 1, 3])]
    ornt = io_orientation(sub)
    transform = ornt_transform(ornt, axcodes2ornt("RAS"[:ndim]))
    shape = array.shape[1:]
    # apply_orientation works on spatial-first arrays: put channels last, reorient, put them first again
    view = np.moveaxis(apply_orientation(np.moveaxis(array, 0, -1), transform), -1, 0)
    new_sub = sub @ inv_ornt_aff(transform, shape)
    if ndim == 3:
        return view, new_sub
    out = affine.copy()
    out[np.ix_([0, 1, 3], [0, 1, 3])] = new_sub
    return view, out


def ras_order(affine: np.ndarray, dims: int) -> np.ndarray:
    """Index of the source axis that becomes each RAS axis (2D pictures keep their axes)."""
    if dims == 2:
        return np.array([0, 1])
    ornt = io_orientation(affine)  # row i: RAS axis of source axis i
    order = np.empty(3, dtype=int)
    order[ornt[:, 0].astype(int)] = np.arange(3)
    return order


def ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing along the RAS axes of the reoriented grid."""
    return np.linalg.norm(affine[:3, :3], axis=0)[ras_order(affine, 3)]


def radiological_planes(ras: np.ndarray, centre: tuple[int, int, int], spacing: np.ndarray) -> list[tuple[str, np.ndarray, float]]:
    """The axial, coronal and sagittal planes through ``centre`` of a RAS-ordered ``(X, Y, Z)`` array, ready for
    ``imshow`` (rows top to bottom): patient right on the left, anterior and superior up. Returns
    ``[(name, plane, aspect)]``.

    Examples:
        >>> planes = radiological_planes(np.zeros((4, 5, 6)), (1, 2, 3), np.array([1.0, 1.0, 2.0]))
        >>> [(name, plane.shape, aspect) for name, plane, aspect in planes]
        [('axial', (5, 4), 1.0), ('coronal', (6, 4), 2.0), ('sagittal', (6, 5), 2.0)]
    """
    x, y, z = centre
    sx, sy, sz = (float(s) for s in spacing)
    return [
        ("axial", ras[::-1, :, z].T[::-1], sy / sx),
        ("coronal", ras[::-1, y, :].T[::-1], sz / sx),
        ("sagittal", ras[x, ::-1, :].T[::-1], sz / sy),
    ]
