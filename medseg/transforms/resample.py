"""Linear resampling of an image already reoriented to RAS onto the model's spacing, one axis at a time.

Training resamples with MONAI's ``Spacingd`` (bilinear, border padding, ``align_corners=False``, the direction
kept): after reorientation the map from an output voxel index to an input voxel index is a scaling plus a shift
per axis (``inv(input affine) @ output affine`` is diagonal), and trilinear interpolation with border padding is
the product of three 1D linear interpolations with clamped coordinates. So the same function is computed here axis
by axis — the most shrinking axis first, each pass a gather and a ``lerp`` — instead of through ``affine_grid``'s
dense grid of ``3 x output voxels`` coordinates and ``grid_sample``. The output grid (shape and affine) is
``Spacingd``'s own, computed lazily by MONAI without touching the voxels.

``tests/inference/test_resample.py`` compares the prediction path with MONAI's training transforms on random
oblique, flipped and anisotropic inputs (equal within float32 rounding, far below 1e-4 after normalisation).
Measured on a 512 x 512 x 300 int16 CT at 0.8 x 0.8 x 1.5 mm to 1.5 x 1.5 x 3 mm (2 cores): see
``benchmarks/results/pipeline.json`` (``preprocess``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medseg.io.nifti import stored_tensor
from medseg.io.volume import check_allocation


def model_grid(shape: tuple[int, ...], affine: np.ndarray, spacing: tuple[float, ...]) -> tuple[tuple[int, ...], np.ndarray]:
    """The grid ``Spacingd(pixdim=spacing)`` resamples a RAS image of spatial ``shape`` and 4x4 ``affine`` to:
    ``(shape, affine)`` from MONAI's lazy mode (no voxel is read). 3D only."""
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    stand_in = MetaTensor(torch.zeros(1).expand(1, *shape), affine=torch.as_tensor(affine, dtype=torch.float64))
    pending: MetaTensor = Spacing(pixdim=spacing, mode="bilinear", lazy=True)(stand_in)  # type: ignore[assignment]
    return tuple(int(s) for s in pending.peek_pending_shape()), np.asarray(pending.peek_pending_affine(), np.float64)


def check_model_grid(shape: tuple[int, ...], channels: int, spacing: tuple[float, ...], target: tuple[float, ...],
                     images: int = 1) -> None:
    """Refuses, before resampling, an image whose grid at the model's spacing (``shape``) would not fit in memory
    (a header with 1000 mm voxels resampled to 1 mm: 10^9 times the voxels), naming both spacings.

    Raises:
        InputError: ``MODEL_GRID_TOO_LARGE``.
    """
    nbytes = math.prod(shape) * channels * 4 * images
    check_allocation(nbytes, f"the image at the model's spacing {list(target)} mm (its own: "
                     f"{[round(float(c), 4) for c in spacing]} mm) would be {'x'.join(map(str, shape))} voxels",
                     code="MODEL_GRID_TOO_LARGE", hint="check the voxel spacing in the image's header")


def index_map(source_affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    """``inv(source) @ target``: target voxel index to source voxel index (homogeneous 4x4).

    Raises:
        ValueError: the map is not a scaling and shift per axis (the two grids' directions differ).
    """
    xform = np.linalg.solve(source_affine, target_affine)
    linear = xform[:3, :3]
    if np.abs(linear - np.diag(np.diag(linear))).max() > 1e-6 * max(1.0, float(np.abs(linear).max())):
        raise ValueError("the grids' directions differ: not separable")
    return xform


def resample_separable(image: np.ndarray | torch.Tensor, xform: np.ndarray, shape: tuple[int, ...],
                       device: torch.device | None = None) -> torch.Tensor:
    """Linear resampling of ``image (C, *spatial)`` onto ``shape`` (float32 out), where output index ``i`` along
    axis ``d`` reads input index ``xform[d, d] * i + xform[d, -1]`` clamped to the image (border padding).

    A numpy image is read as it is stored (any dtype torch takes, any axis order, reversed axes included): each
    pass gathers the two neighbour planes along one axis and interpolates, in memory order, so the first pass
    converts only the gathered planes to float32. With a ``device`` the stored array goes there first, in its own
    dtype, and every pass runs there."""
    flips: tuple[int, ...] = ()
    if isinstance(image, np.ndarray):  # axes stored reversed are read forwards, positions counted backwards (below)
        out, flips = stored_tensor(image)
    else:
        out = image
    if device is not None:
        out = out.to(device)
    # work in memory order: spatial axes sorted by stride, outermost first (an F-ordered CT: z, y, x), so every
    # gather copies rows and the outermost pass, which also converts to float32, copies whole planes
    spatial = sorted(range(len(shape)), key=lambda a: (-out.stride(a + 1), a))
    out = out.permute(0, *(a + 1 for a in spatial))
    for k, d in enumerate(spatial):
        n = out.shape[k + 1]
        position = torch.arange(shape[d], dtype=torch.float64) * float(xform[d, d]) + float(xform[d, -1])
        position = position.clamp(0, n - 1)
        if d + 1 in flips:
            position = (n - 1) - position
        low = position.floor().long().clamp(max=max(n - 2, 0))
        weight = (position - low).to(torch.float32)
        view = [1] * out.ndim
        view[k + 1] = -1
        low = low.to(out.device)
        below = out.index_select(k + 1, low).to(torch.float32)
        above = out.index_select(k + 1, (low + 1).clamp(max=n - 1)).to(torch.float32)
        out = torch.lerp(below, above, weight.to(out.device).view(view))
    out = out.permute(0, *(1 + spatial.index(a) for a in range(len(shape))))
    return out.to(torch.float32).contiguous()
