"""Grid bookkeeping for prediction: mapping a label map from the model grid (the input reoriented to RAS by
:func:`medseg.io.orientation.to_ras`, and resampled) back onto the input grid by nearest neighbour with one index array per axis (uint8 in, uint8 out: no
float copy of the volume).

The model grid is the input reoriented to RAS (axis permutation and flips, as MONAI's ``Orientation`` does)
and, when the spacing differs, rescaled along each axis (``Spacing`` keeps directions), so every model axis
depends on exactly one input axis. :func:`map_back` relies on that and refuses anything else.
"""

from __future__ import annotations

import numpy as np

from medseg.errors import InputError


def axis_map(model_affine: np.ndarray, input_affine: np.ndarray, model_shape: tuple[int, ...],
             input_shape: tuple[int, ...]) -> list[tuple[int, np.ndarray]]:
    """For each input axis ``b``: ``(model axis, model index of every input voxel along b)``.

    Raises:
        InputError: ``GRID_NOT_SEPARABLE`` when a model axis mixes input axes (cannot happen for grids made
            by reorientation + per-axis resampling).
    """
    ndim = len(input_shape)
    sel = list(range(ndim)) + [3]
    a_model = model_affine[np.ix_(sel, sel)] if ndim == 3 else model_affine[np.ix_([0, 1, 3], [0, 1, 3])]
    a_input = input_affine[np.ix_(sel, sel)] if ndim == 3 else input_affine[np.ix_([0, 1, 3], [0, 1, 3])]
    m = np.linalg.inv(a_model) @ a_input  # input voxel -> model voxel
    out = []
    for b in range(ndim):
        column = m[:ndim, b]
        a = int(np.argmax(np.abs(column)))
        others = np.delete(column, a)
        if np.abs(others).max(initial=0) > 1e-6 * max(1.0, abs(column[a])):
            raise InputError("GRID_NOT_SEPARABLE", "the model grid is not an axis-wise resampling of the input grid")
        coords = column[a] * np.arange(input_shape[b]) + m[a, ndim]
        index = np.clip(np.floor(coords + 0.5).astype(np.int64), 0, model_shape[a] - 1)
        out.append((a, index))
    if sorted(a for a, _ in out) != list(range(ndim)):
        raise InputError("GRID_NOT_SEPARABLE", "the model grid does not map one-to-one onto the input axes")
    return out


def map_back(values: np.ndarray, mapping: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """Nearest-neighbour values ``(..., *model_spatial)`` on the input grid ``(..., *input_spatial)``.

    When the model grid is the input's reoriented without resampling (every index array runs over a whole model
    axis, forwards or backwards), the result is a view of ``values`` (no copy)."""
    lead = values.ndim - len(mapping)
    order = list(range(lead)) + [lead + a for a, _ in mapping]
    permuted = values.transpose(order)
    steps = [_whole_axis_step(idx, permuted.shape[lead + b]) for b, (_, idx) in enumerate(mapping)]
    if all(step is not None for step in steps):
        return permuted[(Ellipsis, *[slice(None, None, step) for step in steps])]
    index: tuple = np.ix_(*[idx for _, idx in mapping])
    return permuted[(Ellipsis, *index)]


def _whole_axis_step(index: np.ndarray, size: int) -> int | None:
    """1 if ``index`` is ``0, 1, ..., size - 1``, -1 if it is that reversed, else None."""
    if len(index) != size:
        return None
    if np.array_equal(index, np.arange(size)):
        return 1
    return -1 if np.array_equal(index, np.arange(size - 1, -1, -1)) else None
