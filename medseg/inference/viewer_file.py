"""The viewer file of one case: what the reports' interactive viewers (:mod:`medseg.reporting.viewer`) show.

Written while the images are at hand (``medseg evaluate`` into ``overlays/NNN.viewer.npz``, ``medseg predict
--preview`` into ``previews/<case>.viewer.npz``), so the report folder alone renders the viewers and records no
input path. It holds gzip NIfTI files and a JSON description:

- the region of interest (the union of the labels, else the whole image) plus :data:`MARGIN_MM` on every side;
- reduced by whole-voxel block factors to at most :data:`MAX_AXIS` voxels per axis and :data:`MAX_VOXELS` voxels
  (image: block mean; labels and uncertainty: block maximum, so a one-voxel lesion stays visible);
- the image as 8 bits with NIfTI ``scl_slope``/``scl_inter``, so the viewer shows Hounsfield units (CT, told by
  its 0.5th percentile below −500: −1024 to 1526 HU in steps of 10) or the scan's own units (others: their
  0.5–99.5th percentiles in 255 steps);
- labels as uint8, the uncertainty map as uint8 (0..255 standing for normalised entropy 0..1);
- the grid's exact affine (crop offset and block centre folded in), so world positions are those of the input;
- "jump to" marks in world mm computed on the full-resolution labels (:func:`evaluation_marks`,
  :func:`prediction_marks`).
"""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.fsutil import atomic_write
from medseg.io.volume import Volume

MAX_AXIS = 256
MAX_VOXELS = 4_000_000
MARGIN_MM = 20.0
CT_LOW_HU, CT_STEP_HU = -1024.0, 10.0
MAX_MARKS = 24


def _centroid_mm(mask: np.ndarray, affine: np.ndarray) -> list[float]:
    centre = np.asarray(ndimage.center_of_mass(mask), dtype=np.float64)
    return [round(float(v), 3) for v in (affine @ np.append(centre, 1.0))[:3]]


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labelled, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    return labelled, np.bincount(labelled.ravel(), minlength=n + 1)


def evaluation_marks(ref: np.ndarray, pred: np.ndarray, affine: np.ndarray, labels: dict[int, str],
                     overlap: float = 0.1) -> list[dict]:
    """Where to look in one evaluated case, largest first: per label the largest region where prediction and
    reference disagree, reference lesions the prediction missed and predicted lesions absent from the reference
    (the report's lesion rule: covered by less than ``overlap`` of their voxels)."""
    marks: list[dict] = []
    for value, name in sorted(labels.items()):
        r, p = ref == value, pred == value
        differ, sizes = _components(r ^ p)
        if len(sizes) > 1:
            biggest = int(np.argmax(sizes[1:])) + 1
            marks.append({"label": name, "kind": "largest disagreement", "voxels": int(sizes[biggest]),
                          "mm": _centroid_mm(differ == biggest, affine)})
        for mask, other, kind in ((r, p, "missed lesion"), (p, r, "false lesion")):
            parts, sizes = _components(mask)
            if len(sizes) <= 1:
                continue
            covered = np.bincount(parts[other], minlength=len(sizes))
            for k in np.argsort(-sizes[1:]) + 1:
                if covered[k] < overlap * sizes[k] or covered[k] == 0:
                    marks.append({"label": name, "kind": kind, "voxels": int(sizes[k]),
                                  "mm": _centroid_mm(parts == k, affine)})
    return sorted(marks, key=lambda m: -m["voxels"])[:MAX_MARKS]


def prediction_marks(pred: np.ndarray, affine: np.ndarray, labels: dict[int, str],
                     uncertainty: np.ndarray | None = None) -> list[dict]:
    """Where to look in one predicted case: each label's largest part, and the largest region where the model
    is more uncertain than not (normalised entropy at least 0.5; ``uncertainty`` as uint8 0..255 for 0..1)."""
    marks: list[dict] = []
    for value, name in sorted(labels.items()):
        parts, sizes = _components(pred == value)
        if len(sizes) > 1:
            biggest = int(np.argmax(sizes[1:])) + 1
            marks.append({"label": name, "kind": "structure", "voxels": int(sizes[biggest]),
                          "mm": _centroid_mm(parts == biggest, affine)})
    if uncertainty is not None:
        parts, sizes = _components(uncertainty >= 128)
        if len(sizes) > 1:
            biggest = int(np.argmax(sizes[1:])) + 1
            marks.append({"label": "uncertainty", "kind": "most uncertain region", "voxels": int(sizes[biggest]),
                          "mm": _centroid_mm(parts == biggest, affine)})
    return marks[:MAX_MARKS]


def _box(masks: list[np.ndarray], shape: tuple[int, ...], spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Region of interest ``[lo, hi)`` per axis: the labels' bounding box plus the margin (the whole grid without
    labels). From each axis' projection, without listing the labelled voxels."""
    lo, hi = np.asarray(shape), np.zeros(len(shape), int)
    for m in masks:
        for axis in range(len(shape)):
            hit = np.flatnonzero(np.any(m, axis=tuple(a for a in range(len(shape)) if a != axis)))
            if hit.size:
                lo[axis], hi[axis] = min(lo[axis], hit[0]), max(hi[axis], hit[-1] + 1)
    if (hi <= lo).any():
        return np.zeros(len(shape), int), np.asarray(shape)
    margin = np.ceil(MARGIN_MM / np.maximum(spacing, 1e-6)).astype(int)
    return np.maximum(lo - margin, 0), np.minimum(hi + margin, shape)


def _factors(extent: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Integer block factors: at most MAX_AXIS voxels per axis and MAX_VOXELS in all, coarsening the axis with the
    finest reduced spacing first (keeps voxels as near cubic as the budget allows)."""
    f = np.maximum(np.ceil(extent / MAX_AXIS).astype(int), 1)
    while np.prod(np.ceil(extent / f)) > MAX_VOXELS:
        f[int(np.argmin(np.where(extent / f > 1, spacing * f, np.inf)))] += 1
    return f


def _reduce(array: np.ndarray, f: np.ndarray, how: str, chunk: int = 16) -> np.ndarray:
    """Block mean (float32) or maximum with factors ``f`` (edges padded by repeating the last plane), ``chunk``
    output planes of the last axis at a time, so a large input is never copied whole."""
    if (f == 1).all():
        return np.asarray(array, np.float32) if how == "mean" else np.asarray(array)
    out_shape = [-(-s // k) for s, k in zip(array.shape, f)]
    out = np.empty(out_shape, np.float32 if how == "mean" else array.dtype)
    axes = tuple(range(1, 2 * len(f), 2))
    for z0 in range(0, out_shape[-1], chunk):
        z1 = min(z0 + chunk, out_shape[-1])
        part = array[..., z0 * f[-1]:z1 * f[-1]]
        part = np.pad(part, [(0, int(-s % k)) for s, k in zip(part.shape, f)], mode="edge")
        blocks = part.reshape([v for s, k in zip(part.shape, f) for v in (s // k, k)])
        out[..., z0:z1] = blocks.max(axis=axes) if how == "max" else blocks.mean(axis=axes, dtype=np.float32)
    return out


def _nifti_gz(array: np.ndarray, affine: np.ndarray, slope: float = 1.0, inter: float = 0.0) -> bytes:
    import nibabel as nib

    dtype = np.uint8 if array.size == 0 or int(array.max()) <= 255 else np.uint16  # more than 255 labels
    img = nib.Nifti1Image(np.asarray(array, dtype), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_slope_inter(slope, inter)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def write_viewer(target: Path, image: np.ndarray | None, affine: np.ndarray, overlays: dict[str, np.ndarray],
                 labels: dict[int, str], marks: list[dict], uncertainty: np.ndarray | None = None) -> dict:
    """Writes one case's viewer file (``.npz``: the embedded NIfTI files and a JSON description) and returns the
    description.

    Args:
        target: ``*.viewer.npz`` path (written atomically).
        image: ``(X, Y, Z)`` intensities on the labels' grid, or None (a blank background).
        affine: The grid's voxel-to-world (RAS, mm) matrix.
        overlays: Role (``prediction``, ``reference``) -> ``(X, Y, Z)`` label map.
        labels: Label value -> name.
        marks: "Jump to" entries (:func:`evaluation_marks`, :func:`prediction_marks`).
        uncertainty: ``(X, Y, Z)`` normalised entropy as uint8 0..255 standing for 0..1 (as predict keeps it), or
            None.
    """
    if next(iter(overlays.values())).ndim == 2:  # a 2D picture: one slice
        overlays = {role: arr[..., None] for role, arr in overlays.items()}
        image = None if image is None else image[..., None]
        uncertainty = None if uncertainty is None else uncertainty[..., None]
    first = next(iter(overlays.values()))
    shape = tuple(int(s) for s in first.shape)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    lo, hi = _box(list(overlays.values()), shape, spacing)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    f = _factors(hi - lo, spacing)
    step = np.diag(np.append(f.astype(np.float64), 1.0))
    step[:3, 3] = lo + (f - 1) / 2.0  # a block's centre, in input voxels
    grid = affine @ step
    files: dict[str, bytes] = {}
    meta: dict = {"labels": {str(k): v for k, v in sorted(labels.items()) if k > 0}, "marks": marks,
                  "shape": [int(v) for v in np.ceil((hi - lo) / f)], "factors": [int(v) for v in f],
                  "source_shape": list(shape), "spacing_mm": [round(float(v), 4) for v in spacing * f]}
    if image is not None:
        data = _reduce(image[crop], f, "mean")
        finite = data[np.isfinite(data)]
        low_pct = float(np.percentile(finite, 0.5)) if finite.size else 0.0
        if low_pct < -500.0:  # Hounsfield units: air is -1000
            slope, inter, modality = CT_STEP_HU, CT_LOW_HU, "CT"
        else:
            top = float(np.percentile(finite, 99.5)) if finite.size else 1.0
            slope, inter, modality = max((top - low_pct) / 255.0, 1e-6), low_pct, "other"
        coded = np.clip(np.rint((np.nan_to_num(data, nan=inter) - inter) / slope), 0, 255).astype(np.uint8)
        shown = coded[coded > 0] if (coded > 0).any() else coded
        auto = [float(v) * slope + inter for v in np.percentile(shown, [2, 98])]
        meta.update(modality=modality, auto_window=[round(auto[0], 2), round(max(auto[1], auto[0] + slope), 2)])
        files["image"] = _nifti_gz(coded, grid, slope, inter)
    else:
        meta.update(modality="none", auto_window=[0.0, 1.0])
        files["image"] = _nifti_gz(np.zeros(meta["shape"], np.uint8), grid)
    for role, arr in overlays.items():
        files[role] = _nifti_gz(_reduce(arr[crop], f, "max"), grid)
    if uncertainty is not None:
        files["uncertainty"] = _nifti_gz(_reduce(np.asarray(uncertainty[crop], np.uint8), f, "max"), grid, 1.0 / 255.0, 0.0)
    meta["volumes"] = list(files)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            arrays = {k: np.frombuffer(v, np.uint8) for k, v in files.items()}
            np.savez(fh, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)  # type: ignore[arg-type]

    atomic_write(target, write)
    return meta


def write_case_viewer(image: Volume, labels: Volume, uncertainty: Volume | None, names: dict[int, str],
                      target: Path) -> dict:
    """The viewer file of one predicted 3D case (``predict --preview``): the image's first channel, the label map,
    the uncertainty map (uint8 0..255 standing for 0..1) and :func:`prediction_marks`."""
    unc = None if uncertainty is None else uncertainty.array[0]
    marks = prediction_marks(labels.array[0], labels.affine, names, unc)
    return write_viewer(target, image.array[0], image.affine, {"prediction": labels.array[0]}, names, marks, unc)


def read_viewer(path: Path) -> dict:
    """A viewer file as the report embeds it: ``{"meta": {...}, "volumes": {role: base64 .nii.gz}}``."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        volumes = {k: base64.b64encode(bytes(data[k])).decode() for k in meta["volumes"]}
    return {"meta": meta, "volumes": volumes}
