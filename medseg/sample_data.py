"""Deterministic synthetic sample data in the Medical Segmentation Decathlon layout.

Two datasets, each case drawn from its own seeded generator ``default_rng([seed, kind, index])`` so that the
same seed always gives identical voxels, pixels and geometry (and, with the same PNG and gzip encoder versions,
identical bytes: the install lock pins them):

* ``ct3d``: CT-like volumes (int16 HU). A body in air (-1000 HU) with a subcutaneous fat ring, soft tissue,
  a spine, one lobulated textured organ and 0-3 hypodense lesions of 3-20 mm inside it; scanner blur and
  noise; anisotropic spacing (in-plane 0.6-1.0 mm, slices 2-5 mm), varied sizes and non-identity affines
  (flipped axes, in-plane obliquity). Anatomy is defined in world millimetres and sampled through each
  case's affine, so labels are exact whatever the grid. Labels: 0 background, 1 organ, 2 lesion.
* ``derm2d``: dermoscopy-like RGB photos (PNG): skin texture, an irregular pigmented lesion with a soft
  border, hairs drawn over it, vignetting. Binary masks (0 background, 1 lesion).

Regenerate the committed copy with ``medseg sample-data -o sample_data``; :func:`compare_sample_data` checks a
copy against another by decoded content (what a new Pillow or zlib-ng cannot change), not by file bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import bezier_curve

from medseg.fsutil import write_json
from medseg.io.nifti import write_nifti
from medseg.io.volume import Volume

KINDS = ("ct3d", "derm2d")
_PREFIX = {"ct3d": "ct", "derm2d": "derm"}
_HU_AIR, _HU_FAT, _HU_TISSUE, _HU_BONE = -1000.0, -100.0, 40.0, 700.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: tuple[float, ...]) -> np.ndarray:
    """Low-frequency noise with unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return field / max(float(field.std()), 1e-6)


def _ct_affine(rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray) -> np.ndarray:
    """A voxel-to-RAS affine with random flips and (half the time) an in-plane rotation of up to 15 degrees."""
    flips = np.diag(rng.choice([-1.0, 1.0], size=3))
    angle = np.deg2rad(rng.uniform(-15, 15)) if rng.random() < 0.5 else 0.0
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ flips @ np.diag(spacing)
    centre_world = rng.uniform(-40, 40, size=3).round(1)
    affine[:3, 3] = centre_world - affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return affine


def make_ct_case(rng: np.random.Generator) -> Volume:
    """Draws one CT-like case.

    Returns:
        A volume with two channels: ``array[0]`` the image in HU (int16) and ``array[1]`` the labels (uint8),
        both ``(X, Y, Z)``; the caller writes them as separate files.
    """
    spacing = np.array([rng.uniform(0.6, 1.0)] * 2 + [rng.uniform(2.0, 5.0)]).round(3)
    fov = np.array([rng.uniform(84, 96), rng.uniform(76, 90), rng.uniform(90, 115)])
    sx, sy, sz = (int(round(f / s)) for f, s in zip(fov, spacing))
    shape = (sx, sy, sz)
    affine = _ct_affine(rng, shape, spacing)
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2.0) + affine[:3, 3]

    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=-1)
    xyz = ijk @ affine[:3, :3].T.astype(np.float32) + (affine[:3, 3] - centre).astype(np.float32)  # (X, Y, Z, 3)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    sigma_tex = tuple(3.0 / s for s in spacing)

    a, b = rng.uniform(36, 41), rng.uniform(29, 34)
    fat = rng.uniform(2.0, 5.0)
    body_r = (x / a) ** 2 + (y / b) ** 2
    inner = (x / (a - fat)) ** 2 + (y / (b - fat)) ** 2 < 1
    image = np.full(shape, _HU_AIR, dtype=np.float32)
    image[body_r < 1] = _HU_FAT
    image[inner] = _HU_TISSUE + 6 * _smooth_noise(rng, shape, sigma_tex)[inner]
    spine = (x**2 + (y + 0.62 * b) ** 2) < rng.uniform(5.5, 7.5) ** 2
    image[spine] = _HU_BONE

    # Organ: a main ellipsoid plus two lobes, with a low-frequency boundary perturbation.
    centres = [np.array([rng.uniform(-14, -6), rng.uniform(-2, 8), rng.uniform(-8, 8)])]
    axes = [np.array([rng.uniform(14, 19), rng.uniform(11, 15), rng.uniform(22, 30)])]
    for _ in range(2):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        centres.append(centres[0] + direction * axes[0] * rng.uniform(0.4, 0.7))
        axes.append(axes[0] * rng.uniform(0.45, 0.65))
    implicit = np.min(
        [((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 for c, r in zip(centres, axes)],
        axis=0,
    )
    implicit += 0.15 * _smooth_noise(rng, shape, tuple(8.0 / s for s in spacing))
    organ = (implicit < 1) & inner & ~spine
    organ_hu = rng.uniform(95, 120)
    image[organ] = organ_hu + 7 * _smooth_noise(rng, shape, tuple(1.5 / s for s in spacing))[organ]

    label = organ.astype(np.uint8)
    depth_mm = ndimage.distance_transform_edt(organ, sampling=spacing)
    for _ in range(int(rng.integers(0, 4))):
        diameter = rng.uniform(3, 20)
        candidates = np.argwhere(depth_mm >= 0.6 * diameter)
        if len(candidates) == 0:
            continue
        cx, cy, cz = xyz[tuple(candidates[rng.integers(len(candidates))])]
        radii = diameter / 2 * rng.uniform(0.85, 1.15, size=3)
        lesion = ((x - cx) / radii[0]) ** 2 + ((y - cy) / radii[1]) ** 2 + ((z - cz) / radii[2]) ** 2 < 1
        lesion &= organ
        image[lesion] = organ_hu - rng.uniform(40, 60)
        label[lesion] = 2

    image = ndimage.gaussian_filter(image, (0.6 / spacing[0], 0.6 / spacing[1], 0.35))  # scanner PSF
    image += rng.normal(0, rng.uniform(8, 16), size=shape).astype(np.float32)
    image_i16 = np.clip(np.round(image), -1024, 3071).astype(np.int16)
    return Volume(np.stack([image_i16, label.astype(np.int16)]), affine)


def make_derm_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draws one dermoscopy-like case.

    Returns:
        ``(rgb, mask)``: an ``(H, W, 3)`` uint8 photo and an ``(H, W)`` uint8 mask with values 0/1.
    """
    h, w = int(rng.integers(128, 161)), int(rng.integers(128, 161))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    skin = np.array([rng.uniform(195, 235), rng.uniform(145, 185), rng.uniform(115, 160)], dtype=np.float32)
    shade = 8 * _smooth_noise(rng, (h, w), (6, 6))[..., None]  # skin texture: luminance, not colour
    rgb = skin + shade + rng.normal(0, 3, (h, w, 3)).astype(np.float32)

    cy, cx = h / 2 + rng.uniform(-0.12, 0.12) * h, w / 2 + rng.uniform(-0.12, 0.12) * w
    r0 = rng.uniform(0.17, 0.3) * min(h, w)
    theta = np.arctan2(yy - cy, xx - cx)
    boundary = np.ones_like(theta)
    for k in range(2, 7):
        boundary += rng.uniform(0, 0.2) / (k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    signed = r0 * boundary - np.hypot(yy - cy, xx - cx)  # > 0 inside, in pixels
    alpha = np.clip(signed / rng.uniform(2.0, 5.0) + 0.5, 0, 1)[..., None]
    mask = (signed > 0).astype(np.uint8)

    pigment = np.array([rng.uniform(85, 150), rng.uniform(45, 95), rng.uniform(30, 70)], dtype=np.float32)
    blotches = _smooth_noise(rng, (h, w), (4, 4))[..., None]
    lesion_rgb = pigment * (1 + 0.18 * blotches)
    rgb = rgb * (1 - alpha) + lesion_rgb * alpha

    hair = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(0, 7))):
        pts = rng.uniform(0, 1, size=(3, 2)) * [h - 1, w - 1]
        (r0, c0), (r1, c1), (r2, c2) = pts.astype(int).tolist()
        rr, cc = bezier_curve(r0, c0, r1, c1, r2, c2, 1.0, shape=(h, w))
        hair[rr, cc] = True
    if rng.random() < 0.5:  # thicker hairs in half the cases
        hair = ndimage.binary_dilation(hair)
    rgb[hair] = rgb[hair] * 0.25 + np.array([40, 30, 25], dtype=np.float32) * 0.75

    radius = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    rgb *= (1 - rng.uniform(0.1, 0.35) * radius**2)[..., None]
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8), mask


def _dataset_json(name: str, description: str, modality: dict, labels: dict, train: list, test: list, ext: str) -> dict:
    return {
        "name": name,
        "description": description,
        "reference": "synthetic, generated by medseg.sample_data",
        "licence": "CC0-1.0",
        "tensorImageSize": "3D" if ext == ".nii.gz" else "2D",
        "modality": modality,
        "labels": labels,
        "file_ending": ext,
        "numTraining": len(train),
        "numTest": len(test),
        "training": [{"image": f"./imagesTr/{c}{ext}", "label": f"./labelsTr/{c}{ext}"} for c in train],
        "test": [f"./imagesTs/{c}{ext}" for c in test],
    }


def write_sample_data(out: str | Path, cases: int = 16, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> dict[str, Path]:
    """Writes the synthetic datasets, one MSD folder per kind, plus a ``SHA256SUMS`` file.

    Args:
        out: Output folder; ``out/ct3d`` and ``out/derm2d`` are created.
        cases: Cases per dataset; a quarter (at least one) go to the test split.
        seed: Base seed; the same seed gives the same content (and, with the same encoders, the same bytes).
        kinds: Which datasets to write.

    Returns:
        The dataset folder of each kind.
    """
    out = Path(out)
    n_test = max(1, round(cases * 0.25))
    roots: dict[str, Path] = {}
    for kind_index, kind in enumerate(KINDS):
        if kind not in kinds:
            continue
        root = out / kind
        ids = [f"{_PREFIX[kind]}_{i:03d}" for i in range(cases)]
        train, test = ids[: cases - n_test], ids[cases - n_test :]
        for i, case_id in enumerate(ids):
            rng = np.random.default_rng([seed, kind_index, i])
            split = "Tr" if case_id in train else "Ts"
            if kind == "ct3d":
                vol = make_ct_case(rng)
                write_nifti(Volume(vol.array[:1], vol.affine), root / f"images{split}" / f"{case_id}.nii.gz", np.int16)
                write_nifti(Volume(vol.array[1:], vol.affine), root / f"labels{split}" / f"{case_id}.nii.gz", np.uint8)
            else:
                rgb, mask = make_derm_case(rng)
                for sub, arr in ((f"images{split}", rgb), (f"labels{split}", mask)):
                    (root / sub).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(arr).save(root / sub / f"{case_id}.png", optimize=False)
        if kind == "ct3d":
            meta = _dataset_json(
                "SyntheticCT", "CT-like phantoms: organ with hypodense lesions", {"0": "CT"},
                {"0": "background", "1": "organ", "2": "lesion"}, train, test, ".nii.gz",
            )
        else:
            meta = _dataset_json(
                "SyntheticDermoscopy", "dermoscopy-like RGB photos with one pigmented lesion",
                {"0": "R", "1": "G", "2": "B"}, {"0": "background", "1": "lesion"}, train, test, ".png",
            )
        write_json(root / "dataset.json", meta)
        roots[kind] = root
    _write_checksums(out)
    return roots


def _write_checksums(out: Path) -> None:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in ("SHA256SUMS", "README.md"))
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(out).as_posix()}" for p in files]
    (out / "SHA256SUMS").write_text("\n".join(lines) + "\n", encoding="utf-8")


#: Largest affine difference (mm) two copies of a volume may have: the geometry contract's round-trip tolerance.
#: Largest share of an image's values that may differ by one unit between two generations (CPU float rounding).
ROUNDING_FRACTION = 1e-4
AFFINE_TOLERANCE_MM = 1e-4
_CHECKSUMS = ("SHA256SUMS", "README.md")


def _nifti_content(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    import nibabel as nib

    img: Any = nib.load(str(path))  # a Nifti1Image
    header = img.header
    geometry = {
        "sform": header.get_sform(), "qform": header.get_qform(),
        "codes": np.array([int(header["sform_code"]), int(header["qform_code"])]),
        "units": np.array(header.get_xyzt_units(), dtype=object),
    }
    return np.asanyarray(img.dataobj), geometry


def _values_difference(a: np.ndarray, b: np.ndarray, what: str, exact: bool) -> str | None:
    """Images may differ by one unit in a few values (``ROUNDING_FRACTION``): the generator's float32 maths
    (numpy's SIMD cos/arctan2/hypot, BLAS kernels) rounds differently on other CPUs, and a value on a .5 boundary
    then rounds the other way. Labels (``exact``) must be equal."""
    if np.array_equal(a, b):
        return None
    diff = np.abs(a.astype(np.int64) - b.astype(np.int64)) if a.dtype.kind in "iub" else np.abs(a - b)
    n, largest = int(np.count_nonzero(diff)), float(diff.max())
    if not exact and largest <= 1 and n <= max(1, ROUNDING_FRACTION * a.size):
        return None
    return f"{n} {what} differ (by up to {largest:g})"


def _file_difference(expected: Path, actual: Path) -> str | None:
    """How two files differ in content, or None: NIfTI by dtype, voxels and geometry, pictures by mode and
    pixels, JSON by value, anything else by bytes. Label maps must be equal; images may differ by one unit in at
    most ``ROUNDING_FRACTION`` of their values (another CPU's float rounding, see :func:`_values_difference`)."""
    name = expected.name.lower()
    exact = any(part.startswith("labels") for part in expected.parts[-2:-1])
    if name.endswith((".nii", ".nii.gz")):
        (a, ga), (b, gb) = _nifti_content(expected), _nifti_content(actual)
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"voxels {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        difference = _values_difference(a, b, "voxels", exact)
        if difference:
            return difference
        for key in ("sform", "qform"):
            if not np.allclose(ga[key], gb[key], rtol=0, atol=AFFINE_TOLERANCE_MM):
                return f"{key} differs by {float(np.abs(ga[key] - gb[key]).max()):.3g} mm"
        if not (np.array_equal(ga["codes"], gb["codes"]) and np.array_equal(ga["units"], gb["units"])):
            return "sform/qform codes or units differ"
        return None
    if name.endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")):
        with Image.open(expected) as ia, Image.open(actual) as ib:
            if ia.mode != ib.mode or ia.size != ib.size:
                return f"picture {ia.mode}{ia.size} != {ib.mode}{ib.size}"
            pa, pb = np.asarray(ia), np.asarray(ib)
        return _values_difference(pa, pb, "pixel values", exact)
    if name.endswith(".json"):
        same = json.loads(expected.read_text(encoding="utf-8")) == json.loads(actual.read_text(encoding="utf-8"))
        return None if same else "JSON content differs"
    return None if expected.read_bytes() == actual.read_bytes() else "bytes differ"


def compare_sample_data(expected: str | Path, actual: str | Path) -> list[str]:
    """Compares two sample-data folders by content: the same files, the same voxels, pixels, geometry and labels.

    File bytes are not compared: a PNG or gzip encoder of another version writes other bytes for the same
    pixels. ``SHA256SUMS`` and ``README.md`` are skipped (``SHA256SUMS`` lists one copy's bytes). Label maps
    (``labels*/``) must be equal; images may differ by one grey level (or HU) in at most one value in 10,000:
    on another CPU, numpy's vectorised float32 functions and BLAS kernels may round differently (seen: regenerated
    on a 2-core AMD EPYC with the locked library versions, one pixel of ``derm_007.png`` came out 131, not 132).

    Args:
        expected: The reference folder (e.g. the committed ``sample_data``).
        actual: The folder to check (e.g. freshly regenerated).

    Returns:
        One line per difference (``relative/path: what differs``); empty when the content is the same.
    """
    expected, actual = Path(expected), Path(actual)

    def listing(root: Path) -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name not in _CHECKSUMS}

    want, have = listing(expected), listing(actual)
    problems = [f"{name}: missing" for name in sorted(want - have)]
    problems += [f"{name}: not expected" for name in sorted(have - want)]
    for name in sorted(want & have):
        difference = _file_difference(expected / name, actual / name)
        if difference:
            problems.append(f"{name}: {difference}")
    return problems
