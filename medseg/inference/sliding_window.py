"""Sliding-window prediction with bounded memory: windows are visited in order of their start along the last
spatial axis, and output slabs that no later window touches are finalised and handed out as soon as they are
complete.

Window positions, padding of images smaller than a window and the Gaussian importance map are MONAI's
(``dense_patch_slices`` with ``_get_scan_interval``, ``compute_importance_map``), so results match
``monai.inferers.sliding_window_inference`` to float rounding. They are restated here in a few lines of torch and
Python rather than imported, so that prediction with an exported model never imports MONAI (about 1.2 s of start-up
even without its optional integrations, :mod:`medseg.lean_imports`); ``tests/inference/test_sliding_window.py``
checks them equal to MONAI's over many shapes, overlaps and sigmas. What differs is memory: MONAI keeps a float map per output channel for the whole image; here
the accumulator spans about one window depth along the last axis (``K x X x Y x (roi_z + step)`` values plus a
weight map of ``X x Y x (roi_z + step)``), whatever the image's length.

Windows come from a *source* callable, so the image never has to exist as one float tensor: the predictor cuts
windows from the stored (e.g. int16) image and normalises each batch on the fly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

WindowSource = Callable[[Sequence[slice]], torch.Tensor]  # slices of the padded image -> (C, *roi) float32
Network = Callable[[torch.Tensor], torch.Tensor]  # (B, C, *roi) -> (B, K, *roi)


@dataclass(frozen=True)
class WindowLayout:
    """Where windows go on an image: MONAI-compatible padding and positions."""

    shape: tuple[int, ...]  # image spatial shape
    roi: tuple[int, ...]
    overlap: float

    @property
    def pad(self) -> tuple[tuple[int, int], ...]:
        """Per axis ``(before, after)`` padding for axes shorter than the window (split as MONAI does)."""
        out = []
        for size, r in zip(self.shape, self.roi):
            diff = max(r - size, 0)
            out.append((diff // 2, diff - diff // 2))
        return tuple(out)

    @property
    def padded(self) -> tuple[int, ...]:
        """Spatial shape after padding."""
        return tuple(max(s, r) for s, r in zip(self.shape, self.roi))

    def windows(self) -> list[tuple[slice, ...]]:
        """Window slices on the padded image, ordered by their start on the last axis (then MONAI's order)."""
        starts = [window_starts(size, r, self.overlap) for size, r in zip(self.padded, self.roi)]
        slices = [tuple(slice(s, s + r) for s, r in zip(corner, self.roi)) for corner in itertools.product(*starts)]
        return sorted(slices, key=lambda s: s[-1].start)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis of ``size`` (>= ``roi``) as MONAI places them: a step of
    ``int(roi * (1 - overlap))`` (at least 1; ``roi`` when the window fits exactly), as many steps as it takes to
    reach the end, the last window moved back to end at the border (``_get_scan_interval`` and
    ``dense_patch_slices``)."""
    step = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    count = next((d for d in range(math.ceil(size / step)) if d * step + roi >= size), 0) + 1
    return [d * step - max(d * step + roi - size, 0) for d in range(count)]


def importance_map(roi: Sequence[int], mode: str, device: torch.device, sigma_scale: float = 0.125) -> torch.Tensor:
    """MONAI's window weights (``compute_importance_map``): Gaussian (sigma ``sigma_scale`` x window; config
    ``inference.gaussian_sigma``, not normalised, clamped below at its minimum or 1e-3) or constant."""
    if mode == "constant":
        weights = torch.ones(tuple(roi), device=device, dtype=torch.float)
    elif mode == "gaussian":
        weights = torch.ones((), device=device, dtype=torch.float)
        for size in roi:
            x = torch.arange(start=-(size - 1) / 2.0, end=(size - 1) / 2.0 + 1, dtype=torch.float, device=device)
            weights = weights.unsqueeze(-1) * torch.exp(x**2 / (-2 * (size * sigma_scale) ** 2))
    else:
        raise ValueError(f"blend mode {mode!r}: constant or gaussian")
    return torch.clamp_(weights, min=max(torch.min(weights).item(), 1e-3)).to(torch.float32)


class _Ring:
    """Weighted sums over a ring buffer along the last axis: padded plane z lives at z % depth.

    Before a batch runs, every plane below its first window's start has been handed out, and no window of it
    reaches beyond its last start + roi: depth = roi + the largest start spread within a batch suffices.
    """

    def __init__(self, layout: WindowLayout, n_out: int, depth: int, weight: torch.Tensor, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.layout, self.depth, self.weight = layout, depth, weight
        padded = layout.padded
        self.acc = torch.zeros((n_out, *padded[:-1], depth), dtype=dtype, device=device)
        self.norm = torch.zeros((*padded[:-1], depth), dtype=dtype, device=device)
        self.emitted = 0  # padded last-axis index up to which output has been handed out
        self.inner = tuple(slice(b, b + s) for (b, _), s in zip(layout.pad[:-1], layout.shape[:-1]))

    def pieces(self, start: int, stop: int) -> list[tuple[slice, slice]]:
        """(ring planes, offset within [start, stop)) pieces of the padded range [start, stop)."""
        a, n, depth = start % self.depth, stop - start, self.depth
        if a + n <= depth:
            return [(slice(a, a + n), slice(0, n))]
        first = depth - a
        return [(slice(a, depth), slice(0, first)), (slice(0, n - first), slice(first, n))]

    def add(self, window: tuple[slice, ...], values: torch.Tensor) -> None:
        """Weights and accumulates one window's output ``(n_out, *roi)`` in one pass."""
        for r, part in self.pieces(window[-1].start, window[-1].stop):
            self.acc[(slice(None), *window[:-1], r)].addcmul_(values[..., part], self.weight[..., part])
            self.norm[(*window[:-1], r)] += self.weight[..., part]

    def emit(self, upto: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Hands out the finished planes below padded index ``upto`` and frees those windows will write again."""
        if upto <= self.emitted:
            return
        z_pad, z_size = self.layout.pad[-1][0], self.layout.shape[-1]
        # padded range [emitted, upto) intersected with the unpadded image [z_pad, z_pad + z_size)
        start, stop = max(self.emitted, z_pad), min(upto, z_pad + z_size)
        if stop > start:  # normalised in place: the slab is a view, valid until the next step of the generator
            parts = [self.acc[(slice(None), *self.inner, r)].div_(self.norm[(*self.inner, r)])
                     for r, _ in self.pieces(start, stop)]
            yield start - z_pad, stop - z_pad, parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        reused = min(upto, self.layout.padded[-1] - self.depth)  # planes z with z + depth inside the image come again
        if reused > self.emitted:
            for r, _ in self.pieces(self.emitted, reused):  # free them for the windows to come
                self.acc[..., r] = 0
                self.norm[..., r] = 0
        self.emitted = upto


def sliding_window(
    source: WindowSource,
    layout: WindowLayout,
    network: Network,
    n_out: int,
    *,
    sw_batch_size: int = 2,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    device: torch.device | str = "cpu",
    accumulate: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    on_window: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Predicts all windows and yields finished slabs along the last spatial axis.

    Args:
        source: Returns the input window ``(C, *roi)`` for slices of the padded image.
        layout: Image shape, window size and overlap.
        network: Maps a batch of windows to outputs ``(B, n_out, *roi)`` (logits or probabilities).
        n_out: Output channels.
        sw_batch_size: Windows per network call.
        mode: ``gaussian`` or ``constant`` blending.
        sigma_scale: Gaussian sigma as a share of the window size (MONAI's default 0.125).
        device: Where windows are predicted.
        accumulate: Where the accumulator lives (default: ``device``); ``cpu`` stitches on the host.
        dtype: Accumulator dtype (float16 halves its memory; only for bounded outputs such as probabilities).
        on_window: Progress callback ``(done, total)``.

    Yields:
        ``(z0, z1, values)``: the blended output ``(n_out, X, Y[, ...], z1 - z0)`` for the unpadded image's
        last-axis range ``[z0, z1)``, in increasing order, covering the whole image exactly once. ``values`` is
        a view into the accumulator: use or copy it before advancing the generator.
    """
    device = torch.device(device)
    acc_device = torch.device(accumulate) if accumulate is not None else device
    windows = layout.windows()
    weight = importance_map(layout.roi, mode, acc_device, sigma_scale).to(dtype)
    # batches run over the sorted windows regardless of their start (as MONAI's do: no half-empty batches)
    batches = [windows[b : b + sw_batch_size] for b in range(0, len(windows), sw_batch_size)]
    spread = max((batch[-1][-1].start - batch[0][-1].start for batch in batches), default=0)
    ring = _Ring(layout, n_out, layout.roi[-1] + spread, weight, acc_device, dtype)
    done, total = 0, len(windows)
    for batch_slices in batches:
        yield from ring.emit(batch_slices[0][-1].start)  # nothing below this start can change any more
        batch = torch.stack([source(s) for s in batch_slices]).to(device)
        out = network(batch).to(acc_device, dtype)
        for s, values in zip(batch_slices, out):
            ring.add(s, values)
        done += len(batch_slices)
        if on_window is not None:
            on_window(done, total)
    yield from ring.emit(layout.padded[-1])


def argmax_labels(values: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """``values.argmax(0)`` (first maximum on ties) as ``dtype``, about 10x faster than ``argmax`` over the
    leading axis of a strided slab on CPU: one comparison pass per class."""
    best = values[0].clone()
    labels = torch.zeros(values.shape[1:], dtype=dtype, device=values.device)
    for k in range(1, values.shape[0]):
        better = values[k] > best
        labels.masked_fill_(better, k)
        torch.where(better, values[k], best, out=best)
    return labels
