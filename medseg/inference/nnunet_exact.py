"""nnU-Net v2's preprocessing and prediction, reproduced step by step for models read from nnU-Net results folders
(:mod:`medseg.models.nnunet`), so that medseg's outputs of such a model are nnU-Net's own (``exact`` mode):

1. the image in nnU-Net's array order: ``(C, Z, Y, X)`` of the stored voxels (what its SimpleITK and nibabel readers
   give), spacing reversed; then the plans' ``transpose_forward``;
2. crop to the non-zero region (any channel non-zero, holes filled);
3. normalisation per channel, before resampling: ``CTNormalization`` (clip to the dataset's foreground 0.5/99.5
   percentiles, z-score with its foreground mean and std), ``ZScoreNormalization`` (within the non-zero mask where
   ``use_mask_for_norm``), ``NoNormalization``, ``RescaleTo01Normalization``, ``RGBTo01Normalization``;
4. resampling to the configuration's spacing as ``resample_data_or_seg_to_shape`` does it: scikit-image ``resize``
   (order 3, edge mode) and, for anisotropic spacing, in-plane resizing then order-0 ``map_coordinates`` along the
   low-resolution axis. The same numbers, bit for bit, computed faster and in less memory: scipy's zoom on slabs
   of output planes and the spline filter on chunks of lines, on threads (scipy releases the GIL), padding and
   filtering one float64 array in place, never a float64 copy of the whole output;
5. sliding window with tile step 0.5, nnU-Net's Gaussian importance map (sigma 1/8 of the tile, float16), windows in
   nnU-Net's order, accumulation in float16 as nnU-Net does, mirroring over the checkpoint's
   ``inference_allowed_mirroring_axes`` averaging logits, folds averaged as logits;
6. logits resampled back to the cropped shape (order 1, same separate-z rule), argmax, put back into the uncropped
   grid, ``transpose_backward``, then the stored voxel order again.

``fast`` mode keeps steps 1-3 and the window layout and trades exactness for time: the data is resampled with
trilinear interpolation (torch), no mirroring unless asked for, float32 accumulation, and the argmax labels (not
the logits) are resampled back by nearest neighbour. Its agreement with exact mode is measured by the tests and
``benchmarks/nnunet.py``.

The resampling and window arithmetic follow nnU-Net 2.x (``nnunetv2.preprocessing``, ``nnunetv2.inference``,
Apache-2.0) and are tested against it (``tests/models/test_nnunet_parity.py``); nnU-Net is never imported here.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medseg.errors import InputError

ANISO_THRESHOLD = 3.0  # nnunetv2.configuration.ANISO_THRESHOLD
Network = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Preprocessed:
    """The network's input and what export needs to undo preprocessing."""

    data: torch.Tensor  # (C, *model grid) float32
    shape_before_cropping: tuple[int, ...]
    bbox: list[list[int]]
    shape_after_cropping: tuple[int, ...]
    spacing: list[float]  # after transpose_forward
    timings: dict[str, float]


# ------------------------------------------------------------------------------------------------ preprocessing

def nnunet_order(array: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, list[float]]:
    """``(C, X, Y, Z)`` stored voxels -> nnU-Net's ``(C, Z, Y, X)`` float32 copy and spacing ``[sz, sy, sx]``."""
    data = np.asarray(array).transpose(0, 3, 2, 1).astype(np.float32)
    return data, [float(s) for s in spacing[::-1]]


def crop_to_nonzero(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """nnU-Net's ``crop_to_nonzero`` without a segmentation: ``(cropped data, non-zero mask of the crop, bbox)``."""
    from scipy.ndimage import binary_fill_holes

    mask = data[0] != 0
    for c in range(1, data.shape[0]):
        mask |= data[c] != 0
    mask = binary_fill_holes(mask)
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        bbox.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, int(mask.shape[axis])])
    slicer = tuple(slice(lo, hi) for lo, hi in bbox)
    return data[(slice(None), *slicer)], mask[slicer], bbox


def normalise(data: np.ndarray, mask: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """The plans' normalisation schemes, per channel, in place (nnU-Net's ``default_normalization_schemes``).

    Raises:
        InputError: ``RGB_RANGE_INVALID`` for an RGB channel outside 0..255.
    """
    eps = 1e-8
    for c, scheme in enumerate(spec["normalization_schemes"]):
        image = data[c]
        if scheme == "CTNormalization":
            props = spec["intensity"].get(str(c)) or {}
            np.clip(image, props["percentile_00_5"], props["percentile_99_5"], out=image)
            image -= props["mean"]
            image /= max(props["std"], eps)
        elif scheme == "ZScoreNormalization":
            if spec["use_mask_for_norm"][c]:
                mean = image[mask].mean()
                std = image[mask].std()
                image[mask] = (image[mask] - mean) / (max(std, eps))
            else:
                mean = image.mean()
                std = image.std()
                image -= mean
                image /= max(std, eps)
        elif scheme == "RescaleTo01Normalization":
            image -= image.min()
            image /= np.clip(image.max(), a_min=eps, a_max=None)
        elif scheme == "RGBTo01Normalization":
            if image.min() < 0 or image.max() > 255:
                raise InputError("RGB_RANGE_INVALID", f"channel {c} is RGB for this model (0..255) but holds values "
                                 f"from {float(image.min()):g} to {float(image.max()):g}")
            image /= 255.0
        # NoNormalization: the float32 copy as it is
    return data


def new_shape_for(shape: tuple[int, ...], old_spacing: list[float], new_spacing: list[float]) -> list[int]:
    """nnU-Net's ``compute_new_shape``."""
    return [int(round(i / j * k)) for i, j, k in zip(old_spacing, new_spacing, shape)]


def _separate_z(force: bool | None, current: list[float], new: list[float],
                threshold: float = ANISO_THRESHOLD) -> tuple[bool, int | None]:
    """nnU-Net's ``determine_do_sep_z_and_axis``."""
    def lowres(spacing: list[float]) -> np.ndarray:
        return np.where(max(spacing) / np.array(spacing) == 1)[0]

    axis: Any = None
    if force is not None:
        do = bool(force)
        axis = lowres(current) if force else None
    elif np.max(current) / np.min(current) > threshold:
        do, axis = True, lowres(current)
    elif np.max(new) / np.min(new) > threshold:
        do, axis = True, lowres(new)
    else:
        do = False
    if axis is not None:
        if len(axis) in (2, 3):
            return False, None
        axis = int(axis[0])
    return do, axis


class _Threads(ThreadPoolExecutor):
    """A thread pool that runs a function on slabs of a range, one call per slab (scipy releases the GIL)."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.workers = workers

    def slabs(self, length: int, run: Callable[[int, int], None], voxels_per_index: int = 0,
              max_voxels: int = 1 << 20) -> None:
        """``run(a, b)`` over ``[0, length)``: one slab per thread, or more where slabs would exceed ``max_voxels``."""
        count = max(self.workers, -(-length * voxels_per_index // max_voxels))
        edges = np.linspace(0, length, min(count, length) + 1).astype(int)
        list(self.map(lambda ab: run(*ab), zip(edges[:-1], edges[1:])))


def _zoom_shift() -> Callable[..., Any] | None:
    """scipy's private ``_nd_image.zoom_shift`` (what ``scipy.ndimage.zoom`` calls) if it computes a slab of output
    planes exactly as ``zoom`` computes them: checked once, on small arrays, against ``zoom`` itself for orders 1 and
    3; ``None`` (scikit-image's ``resize`` is then called whole) where it does not or is missing."""
    global _ZOOM_SHIFT_CHECKED, _ZOOM_SHIFT
    if _ZOOM_SHIFT_CHECKED:
        return _ZOOM_SHIFT
    _ZOOM_SHIFT_CHECKED = True
    try:
        from scipy.ndimage import _nd_image, _ni_support, zoom

        if _ni_support._extend_mode_to_code("nearest") != _NEAREST:
            return None
        function = _nd_image.zoom_shift
        probe = np.random.default_rng(0).normal(size=(9, 8, 7)).astype(np.float32)
        for order, shape in ((3, (13, 5, 9)), (1, (4, 11, 7))):
            factors = [1 / (i / o) for i, o in zip(probe.shape, shape)]
            whole = zoom(probe, factors, order=order, mode="nearest", grid_mode=True, output=np.float64)
            slabs = np.empty(shape, np.float64)
            filtered, npad = _filtered(probe, order)
            for a, b in ((0, 2), (2, shape[0])):
                function(filtered, _zoom_factors(probe.shape, shape), np.array([float(a), 0.0, 0.0]), slabs[a:b],
                         order, _NEAREST, 0.0, npad, True)
            if not np.array_equal(whole, slabs):
                return None
        _ZOOM_SHIFT = function
    except Exception:  # noqa: BLE001 - any failure means: use scikit-image's resize, whole
        _ZOOM_SHIFT = None
    return _ZOOM_SHIFT


_ZOOM_SHIFT_CHECKED = False
_ZOOM_SHIFT: Callable[..., Any] | None = None
_NEAREST = 0  # scipy.ndimage's code for mode "nearest" (scikit-image's "edge"); _zoom_shift checks it


def _zoom_factors(shape: tuple[int, ...], target: tuple[int, ...]) -> np.ndarray:
    """The factors ``scipy.ndimage.zoom`` computes in grid mode: input over output size."""
    return np.ascontiguousarray(np.divide(np.array(shape), np.array(target), dtype=np.float64))


def _filtered(channel: np.ndarray, order: int, pool: _Threads | None = None) -> tuple[np.ndarray, int]:
    """``scipy.ndimage.zoom``'s input to interpolation: for order > 1, the channel edge-padded by 12 in float64 and
    spline-filtered in place (``zoom`` pads a copy, then filters into another), each axis's lines in chunks on
    ``pool``'s threads (lines are filtered one by one: chunks change nothing); else the channel itself. float32 and
    float64 channels of the same values give the same numbers (both are read as doubles)."""
    from scipy.ndimage import spline_filter1d

    if order <= 1:
        return channel, 0
    pad = 12
    padded = np.empty([s + 2 * pad for s in channel.shape], np.float64)
    padded[tuple(slice(pad, pad + s) for s in channel.shape)] = channel
    for axis, size in enumerate(channel.shape):  # numpy's "edge" padding, an axis at a time
        index: list[Any] = [slice(None)] * channel.ndim
        for edge, source in ((slice(0, pad), pad), (slice(pad + size, None), pad + size - 1)):
            index[axis] = edge
            src = list(index)
            src[axis] = slice(source, source + 1)
            padded[tuple(index)] = padded[tuple(src)]
    for axis in range(padded.ndim):
        across = 1 if axis == 0 else 0

        def lines(a: int, b: int, axis: int = axis, across: int = across) -> None:
            index: list[Any] = [slice(None)] * padded.ndim
            index[across] = slice(a, b)
            view = padded[tuple(index)]
            spline_filter1d(view, order, axis, output=view, mode="nearest")

        if pool is None:
            lines(0, padded.shape[across])
        else:
            pool.slabs(padded.shape[across], lines)
    return padded, pad


@dataclass
class _Zoomable:
    """One channel ready for scipy's zoom: its spline coefficients (the channel itself for order <= 1), their
    padding, and the channel's range (scikit-image clips to it) and shape."""

    filtered: np.ndarray
    npad: int
    low: Any
    high: Any
    shape: tuple[int, ...]


def _zoomable(channel: np.ndarray, order: int, pool: _Threads) -> _Zoomable:
    # float16 (nnU-Net's logits) is exact in float32; integers go to float64, as scikit-image takes them
    exact = np.float32 if channel.dtype == np.float16 else np.float64
    source = channel if channel.dtype in (np.float32, np.float64) else channel.astype(exact)
    low, high = np.min(source), np.max(source)
    if np.isnan(low):
        low, high = np.nanmin(source), np.nanmax(source)
    filtered, npad = _filtered(source, order, pool)
    return _Zoomable(filtered, npad, low, high, tuple(channel.shape))


def _slab_zoom(shape: tuple[int, ...], target: tuple[int, ...]) -> Callable[..., Any] | None:
    """scipy's slab function where it may be used for this resize, else ``None``."""
    function = _zoom_shift()
    if function is None or any(int(round(i * (1 / (i / o)))) != o for i, o in zip(shape, target)):
        return None
    return function


def _zoom_into(out: np.ndarray, z: _Zoomable, order: int, pool: _Threads, function: Callable[..., Any]) -> None:
    """scikit-image's resize of ``z``'s channel into ``out`` (C-contiguous), in slabs of output planes on threads.
    float32/float64 outputs are written in place (the double rounded once to the output type, then clipped to the
    input's range, which that type holds exactly: what clipping in float64 and then casting gives); float16 outputs
    go through a float64 slab, as a double rounded straight to float16 may differ from one rounded via float32."""
    target = tuple(out.shape)
    direct = out.dtype in (np.float32, np.float64)
    factors = _zoom_factors(z.shape, target)

    def slab(a: int, b: int) -> None:
        values = out[a:b] if direct else np.empty((b - a, *target[1:]), np.float64)
        function(z.filtered, factors, np.array([float(a)] + [0.0] * (len(target) - 1)), values, order, _NEAREST, 0.0,
                 z.npad, True)
        np.clip(values, z.low, z.high, out=values)
        if not direct:
            out[a:b] = values

    pool.slabs(target[0], slab, int(np.prod(target[1:])))  # slabs of <= 1 M voxels


def _in_plane(channel: np.ndarray, axis: int, target: tuple[int, ...], order: int, pool: _Threads) -> np.ndarray:
    """nnU-Net's separate-z first step: each plane across ``axis`` resized (scikit-image, float64) to the target's
    in-plane size, planes on ``pool``'s threads; float64, with the channel's own count of planes along ``axis``."""
    from skimage.transform import resize

    plane = [t for i, t in enumerate(target) if i != axis]
    shape = list(target)
    shape[axis] = channel.shape[axis]
    here = np.zeros(shape)

    def one(k: int) -> None:
        index: list[Any] = [slice(None)] * 3
        index[axis] = k
        here[tuple(index)] = resize(channel[tuple(index)].astype(float), plane, order, mode="edge", anti_aliasing=False)

    list(pool.map(one, range(channel.shape[axis])))
    return here


def _along_axis(here: np.ndarray, target: tuple[int, ...], order: int, pool: _Threads) -> np.ndarray:
    """nnU-Net's ``map_coordinates(here, coordinates of the target grid, order, mode="nearest")`` along the
    low-resolution axis; for orders 0 and 1 (no spline prefilter, each voxel on its own) in slabs of rows on
    ``pool``'s threads, so that the coordinate grids are never whole-volume."""
    from scipy.ndimage import map_coordinates

    rows, cols, dim = target

    def coordinates(a: int, b: int) -> np.ndarray:
        grids = np.mgrid[a:b, :cols, :dim]
        return np.array([(float(o) / n) * (g + 0.5) - 0.5 for o, n, g in zip(here.shape, target, grids)])

    if order > 1:
        return map_coordinates(here, coordinates(0, rows), order=order, mode="nearest")
    result = np.empty(target, np.float64)

    def slab(a: int, b: int) -> None:
        result[a:b] = map_coordinates(here, coordinates(a, b), order=order, mode="nearest")

    pool.slabs(rows, slab, cols * dim, 2 << 20)
    return result


def resample(data: np.ndarray, new_shape: list[int], current: list[float], new: list[float],
             order: int = 3, order_z: int = 0, force_separate_z: bool | None = None,
             separate_z_anisotropy_threshold: float = ANISO_THRESHOLD, threads: int | None = None) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for images and logits (``is_seg`` False): scikit-image ``resize``
    (edge mode, no anti-aliasing) in float64, the result in the input's dtype - bit for bit, computed in slabs on
    ``threads`` threads (default: torch's thread count)."""
    return resample_taking([data], new_shape, current, new, order, order_z, force_separate_z,
                           separate_z_anisotropy_threshold, threads)


def resample_taking(box: list[np.ndarray], new_shape: list[int], current: list[float], new: list[float],
                    order: int = 3, order_z: int = 0, force_separate_z: bool | None = None,
                    separate_z_anisotropy_threshold: float = ANISO_THRESHOLD, threads: int | None = None) -> np.ndarray:
    """:func:`resample` of the array ``box`` holds, taken out of it: where the caller keeps no other reference, the
    array's memory is freed once the last channel's spline coefficients hold its values (a CT's float32 volume is
    not kept beside its float64 coefficients)."""
    from skimage.transform import resize

    data = box.pop()
    do_separate, axis = _separate_z(force_separate_z, current, new, separate_z_anisotropy_threshold)
    shape = tuple(int(s) for s in data[0].shape)
    target = tuple(int(t) for t in new_shape)
    if shape == target:
        return data
    channels = data.shape[0]
    out = np.zeros((channels, *target), dtype=data.dtype)
    function = _slab_zoom(shape, target)
    with _Threads(max(1, threads or torch.get_num_threads())) as pool:
        for c in range(channels):
            if do_separate:
                assert axis is not None
                here = _in_plane(data[c], axis, target, order, pool)
                out[c] = _along_axis(here, target, order_z, pool) if shape[axis] != target[axis] else here
            elif function is None:  # scipy's slab function unusable: scikit-image, whole, as nnU-Net calls it
                out[c] = resize(data[c].astype(float), target, order, mode="edge", anti_aliasing=False)
            else:
                zoomable = _zoomable(data[c], order, pool)
                if c == channels - 1:
                    del data  # the last channel's values are in its coefficients now
                _zoom_into(out[c], zoomable, order, pool, function)
                del zoomable
    return out


def preprocess(array: np.ndarray, spacing: tuple[float, ...], spec: dict[str, Any], fast: bool = False,
               device: torch.device | None = None) -> Preprocessed:
    """Steps 1-4 of the module docstring on a ``(C, X, Y, Z)`` stored array."""
    t0 = time.perf_counter()
    data, spacing_zyx = nnunet_order(array, spacing)
    forward = spec["transpose_forward"]
    data = data.transpose([0, *[i + 1 for i in forward]])
    original = [spacing_zyx[i] for i in forward]
    before = tuple(int(s) for s in data.shape[1:])
    data, mask, bbox = crop_to_nonzero(data)
    after = tuple(int(s) for s in data.shape[1:])
    target = list(spec["spacing"])
    if len(target) < len(after):
        target = [original[0], *target]
    new_shape = new_shape_for(after, original, target)
    data = normalise(np.ascontiguousarray(data), mask, spec)
    del mask  # not needed by resampling: its memory is free for it
    t1 = time.perf_counter()
    if fast and list(new_shape) != list(after):
        on = device if device is not None and device.type == "cuda" else torch.device("cpu")
        x = torch.from_numpy(data).to(on)[None]
        if len(spec["patch_size"]) == 2:  # 2D configuration: slices along axis 0 keep their count
            x = x[0].transpose(0, 1)
            y = F.interpolate(x, size=tuple(new_shape[1:]), mode="bilinear", align_corners=False).transpose(0, 1)
        else:
            y = F.interpolate(x, size=tuple(new_shape), mode="trilinear", align_corners=False)[0]
        tensor = y.to("cpu", torch.float32).contiguous()
    else:
        kwargs = dict(spec.get("resampling_data") or {})
        kwargs.pop("is_seg", None)
        box = [data]
        del data  # resample_taking frees it once its spline coefficients hold it
        tensor = torch.from_numpy(np.ascontiguousarray(resample_taking(box, new_shape, original, target, **kwargs))).float()
    t2 = time.perf_counter()
    return Preprocessed(tensor, before, bbox, after, original,
                        {"preprocess": round(t1 - t0, 3), "resample": round(t2 - t1, 3)})


# ------------------------------------------------------------------------------------------------ sliding window

def steps_for(image_size: tuple[int, ...], tile: tuple[int, ...], step: float) -> list[list[int]]:
    """nnU-Net's ``compute_steps_for_sliding_window``."""
    target = [i * step for i in tile]
    num = [int(np.ceil((i - k) / j)) + 1 for i, j, k in zip(image_size, target, tile)]
    steps = []
    for dim in range(len(tile)):
        largest = image_size[dim] - tile[dim]
        actual = largest / (num[dim] - 1) if num[dim] > 1 else 99999999999
        steps.append([int(np.round(actual * i)) for i in range(num[dim])])
    return steps


def gaussian_map(tile: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """nnU-Net's ``compute_gaussian`` (sigma 1/8 of the tile, peak 10, zeros replaced by the smallest value)."""
    from scipy.ndimage import gaussian_filter

    tmp = np.zeros(tile)
    tmp[tuple(i // 2 for i in tile)] = 1
    g = gaussian_filter(tmp, [i / 8 for i in tile], 0, mode="constant", cval=0)
    g /= np.max(g) / 10
    out = torch.from_numpy(g).to(device=device, dtype=dtype)
    zero = out == 0
    out[zero] = torch.min(out[~zero])
    return out


def _pad(data: torch.Tensor, tile: tuple[int, ...]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """acvl_utils' ``pad_nd_image`` (constant 0, content centred, the odd voxel above) with its revert slicer."""
    old = list(data.shape)
    new = old[: len(old) - len(tile)] + [max(t, o) for t, o in zip(tile, old[len(old) - len(tile):])]
    diff = [n - o for n, o in zip(new, old)]
    below = [d // 2 for d in diff]
    above = [d // 2 + d % 2 for d in diff]
    if any(diff):
        flat = [v for pair in zip(below[::-1], above[::-1]) for v in pair]
        data = F.pad(data, flat, mode="constant", value=0)
    return data, tuple(slice(b, b + o) for b, o in zip(below, old))


def _slicers(size: tuple[int, ...], tile: tuple[int, ...], step: float) -> list[tuple[Any, ...]]:
    if len(tile) < len(size):
        steps = steps_for(size[1:], tile, step)
        return [(slice(None), d, *[slice(s, s + t) for s, t in zip((sx, sy), tile)])
                for d in range(size[0]) for sx in steps[0] for sy in steps[1]]
    steps = steps_for(size, tile, step)
    return [(slice(None), *[slice(s, s + t) for s, t in zip((sx, sy, sz), tile)])
            for sx in steps[0] for sy in steps[1] for sz in steps[2]]


@torch.inference_mode()
def sliding_window_logits(data: torch.Tensor, tile: tuple[int, ...], network: Network, device: torch.device,
                          mirror_axes: list[int] | None, step: float = 0.5, exact: bool = True,
                          on_window: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """nnU-Net's ``predict_sliding_window_return_logits`` (one window per call, logits averaged over mirrors):
    ``(K, *data spatial)`` logits on the CPU (float16 accumulated in ``exact`` mode, as nnU-Net; else float32)."""
    padded, revert = _pad(data, tile)
    slicers = _slicers(tuple(padded.shape[1:]), tile, step)
    dtype = torch.float16 if exact else torch.float32
    results = torch.device("cpu")
    gaussian = gaussian_map(tile, results, dtype)
    combos: list[tuple[int, ...]] = []
    if mirror_axes:
        dims = [m + 2 for m in mirror_axes]
        combos = [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]
    use_amp = device.type == "cuda"
    logits: torch.Tensor | None = None
    weights = torch.zeros(padded.shape[1:], dtype=dtype, device=results)
    for i, sl in enumerate(slicers):
        work = torch.clone(padded[sl][None], memory_format=torch.contiguous_format).to(device)
        with torch.autocast("cuda") if use_amp else nullcontext():
            pred = network(work)
            for axes in combos:
                pred += torch.flip(network(torch.flip(work, axes)), axes)
            if combos:
                pred /= len(combos) + 1
        pred = pred[0].to(results)
        if logits is None:
            logits = torch.zeros((pred.shape[0], *padded.shape[1:]), dtype=dtype, device=results)
        pred *= gaussian
        logits[sl] += pred
        weights[sl[1:]] += gaussian
        if on_window is not None:
            on_window(i + 1, len(slicers))
    assert logits is not None
    torch.div(logits, weights, out=logits)
    return logits[(slice(None), *revert[1:])]


# ------------------------------------------------------------------------------------------------ back to the input

def _uncrop(cropped: np.ndarray, bbox: list[list[int]], shape: tuple[int, ...], fill: np.ndarray | None = None) -> np.ndarray:
    lead = cropped.shape[: cropped.ndim - len(shape)]
    out = np.zeros((*lead, *shape), dtype=cropped.dtype)
    if fill is not None:
        out[...] = fill.reshape(*fill.shape, *([1] * len(shape)))
    region: tuple[Any, ...] = (Ellipsis, *[slice(lo, hi) for lo, hi in bbox])
    out[region] = cropped
    return out


def _nearest(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    index = [np.minimum(((np.arange(n) + 0.5) * (o / n)).astype(np.int64), o - 1) for n, o in zip(shape, labels.shape)]
    return labels[np.ix_(*index)]


def _argmax(values: np.ndarray, dtype: type, planes: int = 8) -> np.ndarray:
    """``values.argmax(0)`` in ``dtype``, a few planes at a time (numpy's argmax returns int64: 8 bytes a voxel)."""
    out: np.ndarray = np.empty(values.shape[1:], dtype)
    for i in range(0, values.shape[1], planes):
        out[i:i + planes] = values[:, i:i + planes].argmax(0)
    return out


def _max_probability(logits: torch.Tensor, planes: int = 8) -> np.ndarray:
    """The largest softmax probability per voxel of ``(K, *spatial)`` logits, a few planes at a time."""
    out = np.empty(tuple(logits.shape[1:]), np.float32)
    for i in range(0, logits.shape[1], planes):
        out[i:i + planes] = torch.softmax(logits[:, i:i + planes].float(), 0).amax(0).numpy()
    return out


@torch.inference_mode()
def predict(array: np.ndarray, spacing: tuple[float, ...], spec: dict[str, Any], network: Network | list[Network],
            device: torch.device, *, mirroring: bool = True, fast: bool = False, probabilities: bool = False,
            step: float = 0.5, on_window: Callable[[int, int], None] | None = None, confidence: bool = False
            ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Labels (and float32 softmax probabilities) of one ``(C, X, Y, Z)`` image on its own grid, nnU-Net's way.

    ``network``: one function for every fold (their logits averaged per window), or one per fold: then, as nnU-Net
    does, each fold's sliding window is accumulated on its own and the folds' float16 logits are averaged.

    ``confidence``: instead of the probabilities, the probability of each voxel's label (float32, 0 outside the
    non-zero crop), computed a few planes at a time (what ``medseg predict --combine`` compares across models).

    Returns:
        ``(labels (X, Y, Z) uint8|uint16, probabilities (K, X, Y, Z) float32 or None, timings and facts)``.
    """
    prep = preprocess(array, spacing, spec, fast=fast, device=device)
    axes = spec["origin"].get("mirroring_axes") if mirroring else None
    t0 = time.perf_counter()
    networks = network if isinstance(network, list) else [network]
    logits = sliding_window_logits(prep.data, tuple(spec["patch_size"]), networks[0], device, axes, step,
                                   exact=not fast, on_window=on_window)
    for other in networks[1:]:
        logits += sliding_window_logits(prep.data, tuple(spec["patch_size"]), other, device, axes, step,
                                        exact=not fast, on_window=on_window)
    if len(networks) > 1:
        logits /= len(networks)
    model_grid = list(prep.data.shape[1:])
    prep.data = torch.empty(0)  # the network's input is no longer needed
    t1 = time.perf_counter()
    current = list(spec["spacing"])
    if len(current) < len(prep.shape_after_cropping):
        current = [prep.spacing[0], *current]
    n_labels = len(spec["labels"])
    dtype = np.uint8 if n_labels < 256 else np.uint16
    probs = None
    conf = None
    if fast:
        labels = _nearest(torch.argmax(logits, 0).numpy().astype(dtype), prep.shape_after_cropping)
        if confidence:
            conf = _nearest(_max_probability(logits), prep.shape_after_cropping)
        if probabilities:
            size = prep.shape_after_cropping
            x = logits.float()[None]
            if len(spec["patch_size"]) == 2:
                y = F.interpolate(x[0].transpose(0, 1), size=size[1:], mode="bilinear", align_corners=False).transpose(0, 1)
            else:
                y = F.interpolate(x, size=size, mode="trilinear", align_corners=False)[0]
            probs = torch.softmax(y, 0).numpy()
    else:
        kwargs = dict(spec.get("resampling_probabilities") or {})
        kwargs.pop("is_seg", None)
        box = [logits.numpy()]
        del logits  # freed by resample_taking before the last channel is resampled
        back = resample_taking(box, list(prep.shape_after_cropping), current, prep.spacing, **kwargs)
        labels = _argmax(back, dtype)
        if confidence:
            conf = _max_probability(torch.from_numpy(np.asarray(back)))
        if probabilities:
            probs = torch.softmax(torch.from_numpy(np.asarray(back)).float(), 0).numpy()
    labels = _uncrop(labels, prep.bbox, prep.shape_before_cropping)
    backward = spec["transpose_backward"]
    labels = labels.transpose(backward).transpose(2, 1, 0)
    if probs is not None:
        background = np.zeros(probs.shape[0], np.float32)
        background[0] = 1
        probs = _uncrop(probs, prep.bbox, prep.shape_before_cropping, background)
        probs = probs.transpose([0, *[i + 1 for i in backward]]).transpose(0, 3, 2, 1)
    if conf is not None:
        probs = _uncrop(conf, prep.bbox, prep.shape_before_cropping).transpose(backward).transpose(2, 1, 0)
    facts = {**prep.timings, "network": round(t1 - t0, 3), "resample_back": round(time.perf_counter() - t1, 3),
             "model_grid": model_grid, "mode": "fast" if fast else "exact",
             "mirroring_axes": axes, "tile_step": step}
    return np.ascontiguousarray(labels), (np.ascontiguousarray(probs) if probs is not None else None), facts
