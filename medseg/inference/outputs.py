"""What the folder runner writes for one case besides the label maps (:mod:`medseg.inference.formats`): optional
float16 probabilities, the uncertainty map, a three-plane preview, label volumes and the outputs' hashes. Every
file is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medseg.fsutil import atomic_write, sha256_file
from medseg.io.dicom_derived import PYDICOM_ROOT, Producer, label_codes
from medseg.io.nifti import write_nifti
from medseg.io.volume import Volume

if TYPE_CHECKING:
    from medseg.inference.predictor import Predictor

def producer_for(predictor: Predictor, uid_root: str = PYDICOM_ROOT) -> Producer:
    """Who made a prediction, as DICOM outputs record it: the predictor's first model folder (an ensemble is named
    ``<first>+<n-1>`` with the weights hashes combined), its network, weights hash and medseg's version."""
    import hashlib

    import medseg

    members = predictor.members
    name = members[0].model_dir.resolve().name + (f"+{len(members) - 1}" if len(members) > 1 else "")
    hashes = [str(m.info.get("weights_sha256") or "") for m in members]
    weights = hashes[0] if len(hashes) == 1 else hashlib.sha256("".join(hashes).encode()).hexdigest()
    from medseg.models.nnunet import origin_label

    return Producer(name, origin_label(members[0].info) or members[0].cfg.model.name, weights, medseg.__version__, uid_root,
                    label_codes(members[0].cfg.labels))


def write_probabilities(probabilities: Volume, target: Path, label_names: dict[int, str]) -> None:
    """float16 class probabilities ``(K, *spatial)`` on the input grid, compressed ``.npz`` with the affine."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh, probabilities=probabilities.array.astype(np.float16, copy=False), affine=probabilities.affine,
                labels=np.array([label_names[k] for k in sorted(label_names)]),
            )

    atomic_write(target, write)


def write_uncertainty(uncertainty: Volume, target: Path) -> None:
    """The voxel uncertainty map (normalised entropy) on the input grid: uint8 0..255 with NIfTI ``scl_slope``
    1/255, so readers get 0..1."""
    write_nifti(uncertainty, target, np.uint8, slope=1.0 / 255.0)


def write_saliency(saliency: Volume, target: Path) -> None:
    """The ``--explain`` maps on the input grid, one channel per foreground label (4D when several): uint8 0..255
    with ``scl_slope`` 1/255, so readers get 0..1."""
    stored = saliency.with_array((np.clip(saliency.array, 0, 1) * 255).round().astype(np.uint8))
    write_nifti(stored, target, np.uint8, slope=1.0 / 255.0)


def label_volumes_ml(labels: Volume, label_names: dict[int, str]) -> dict[str, float]:
    """Volume in millilitres of every foreground label (area in cm^2 x 1 cm for 2D pictures)."""
    counts = np.bincount(labels.array.ravel(), minlength=max(label_names) + 1)
    voxel_ml = labels.unit_volume_ml
    return {name: round(float(counts[k]) * voxel_ml, 4) for k, name in sorted(label_names.items()) if k > 0}


def preview_colour(label: int) -> str:
    """The colour of a label in the previews (and the review report's viewers): matplotlib's tab10, label 1 first."""
    import matplotlib

    return str(matplotlib.colors.to_hex(matplotlib.colormaps["tab10"]((label - 1) % 10)))


def write_preview(image: Volume, labels: Volume, target: Path, label_names: dict[int, str],
                  uncertainty: Volume | None = None, saliency: Volume | None = None) -> None:
    """PNG with the axial, coronal and sagittal planes through the labelled region's centre, in radiological
    convention like the evaluation report's overlays (:func:`medseg.io.orientation.radiological_planes`; 2D
    pictures: one panel as stored), labels overlaid in colour; with ``uncertainty`` a row shows the
    uncertainty map (normalised entropy, 0..1) over the same planes, with ``saliency`` (``--explain``) a row the
    Grad-CAM map (the largest over the labels, 0..1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medseg.io.orientation import radiological_planes, ras_spacing, to_ras

    extra = [(uncertainty.array, "uncertainty", "normalised entropy", 255.0)] if uncertainty is not None else []
    if saliency is not None:
        extra.append((saliency.array.max(axis=0, keepdims=True), "saliency", "Grad-CAM saliency", 1.0))
    arrays = [image.array[:1], labels.array] + [e[0] for e in extra]
    if len(image.spatial_shape) == 3:
        ras = [to_ras(a, image.affine)[0][0] for a in arrays]
        fg = np.argwhere(ras[1] > 0)
        centre = tuple(fg.mean(axis=0).round().astype(int)) if len(fg) else tuple(s // 2 for s in ras[1].shape)
        views = [radiological_planes(a, centre, ras_spacing(image.affine)) for a in ras]
    else:
        views = [[("plane", a[0].T, image.spacing[1] / image.spacing[0])] for a in arrays]
    data = np.asarray(image.array[0], dtype=np.float32)
    lo, hi = np.percentile(data, [1, 99]) if data.size else (0, 1)
    rows = 1 + len(extra)
    fig, axes = plt.subplots(rows, len(views[0]), figsize=(4 * len(views[0]), 4 * rows), squeeze=False)
    for ax, (name, plane, aspect), (_, seg, _) in zip(axes[0], views[0], views[1]):
        ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
        overlay = np.zeros((*seg.shape, 4))
        for k in sorted(label_names):
            if k > 0:
                overlay[seg == k] = (*matplotlib.colors.to_rgb(preview_colour(k)), 0.45)
        ax.imshow(overlay, aspect=aspect)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    for row, (_, title, unit, scale) in enumerate(extra, start=1):
        for ax, (name, plane, aspect), (_, values, _) in zip(axes[row], views[0], views[1 + row]):
            ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
            shown = ax.imshow(np.ma.masked_less(values / scale, 0.02), cmap="inferno", vmin=0, vmax=1, alpha=0.8,
                              aspect=aspect)
            ax.set_title(f"{title}, {name}", fontsize=9)
            ax.axis("off")
        fig.colorbar(shown, ax=list(axes[row]), fraction=0.02, pad=0.01, label=unit)
    names = ", ".join(f"{k}={v}" for k, v in sorted(label_names.items()) if k)
    fig.suptitle(f"labels: {names} (radiological: patient right on the left)", fontsize=9)
    if not extra:
        fig.tight_layout()
    atomic_write(target, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def verify_output(path: Path) -> bool:
    """True when an output file is there and reads back in full in its format (NIfTI with its gzip CRC, DICOM,
    PNG, ``.npz`` with its zip CRCs): how a run whose manifest was lost tells complete outputs from others."""
    if not path.is_file():
        return False
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            from medseg.io.nifti import read_nifti

            read_nifti(path)
        elif name.endswith(".dcm"):
            import pydicom

            pydicom.dcmread(path).get("PixelData", b"")
        elif name.endswith(".png"):
            from PIL import Image

            with Image.open(path) as img:
                img.load()
        elif name.endswith(".npz"):
            with np.load(path) as archive:
                for key in archive.files:
                    archive[key]
        else:
            return False
    except Exception:  # noqa: BLE001 - any failure to read it back means: not complete
        return False
    return True


def hashes(paths: dict[str, Path], root: Path) -> dict[str, dict[str, str]]:
    """``{kind: {"file": path relative to root, "sha256": hex}}`` of written outputs."""
    return {kind: {"file": p.relative_to(root).as_posix(), "sha256": sha256_file(p)} for kind, p in paths.items()}
