import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from medseg.io.dataset import load_dataset
from medseg.io.nifti import read_nifti
from medseg.sample_data import compare_sample_data, make_ct_case, write_sample_data

REPO = Path(__file__).resolve().parents[1]


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path: Path):
    write_sample_data(tmp_path / "a", cases=4, seed=7)
    write_sample_data(tmp_path / "b", cases=4, seed=7)
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert len(a) == 2 * (1 + 2 * 4) + 1  # per kind: dataset.json + image/label per case; plus SHA256SUMS
    assert a == b


def test_different_seed_gives_different_images(tmp_path: Path):
    write_sample_data(tmp_path / "a", cases=4, seed=1, kinds=("ct3d",))
    write_sample_data(tmp_path / "b", cases=4, seed=2, kinds=("ct3d",))
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert a["ct3d/imagesTr/ct_000.nii.gz"] != b["ct3d/imagesTr/ct_000.nii.gz"]


def test_committed_sample_data_regenerates_with_the_same_content(tmp_path: Path):
    write_sample_data(tmp_path, cases=16, seed=0)  # the documented regeneration command's defaults
    assert compare_sample_data(REPO / "sample_data", tmp_path) == []


def test_committed_files_match_their_checksums():
    committed = REPO / "sample_data"
    listed = dict(reversed(line.split("  ", 1)) for line in (committed / "SHA256SUMS").read_text().splitlines())
    on_disk = {k: v for k, v in _digests(committed).items() if k not in ("SHA256SUMS", "README.md")}
    assert listed == on_disk


def _reencode_nifti(path: Path, change=None) -> None:
    """Rewrites a .nii.gz with the standard library's gzip at another level (other bytes), optionally changed."""
    import gzip

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).copy()
    affine = img.affine.copy()
    if change:
        change(data, affine)
    out = nib.Nifti1Image(data, affine, img.header)
    out.set_sform(affine, code=1)
    out.set_qform(affine, code=1)
    out.header["vox_offset"] = 352
    raw = out.header.binaryblock + b"\x00" * 4 + data.tobytes(order="F")
    path.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))


def _reencode_png(path: Path, change=None) -> None:
    pixels = np.asarray(Image.open(path)).copy()
    if change:
        change(pixels)
    Image.fromarray(pixels).save(path, optimize=True, compress_level=9)


def test_content_check_ignores_encoder_bytes_but_catches_one_changed_voxel(tmp_path: Path):
    committed = REPO / "sample_data"
    copy = tmp_path / "copy"
    shutil.copytree(committed, copy)
    ct, derm = "ct3d/labelsTr/ct_003.nii.gz", "derm2d/imagesTr/derm_002.png"
    before = {name: (copy / name).read_bytes() for name in (ct, derm)}
    _reencode_nifti(copy / ct)
    _reencode_png(copy / derm)
    assert all((copy / name).read_bytes() != before[name] for name in (ct, derm))  # other bytes ...
    assert compare_sample_data(committed, copy) == []  # ... same content

    def flip_voxel(data, affine):
        data[5, 6, 2] = 2 if data[5, 6, 2] != 2 else 1

    def change_pixel(pixels):
        pixels[10, 11, 1] = (int(pixels[10, 11, 1]) + 40) % 256

    _reencode_nifti(copy / ct, flip_voxel)
    _reencode_png(copy / derm, change_pixel)
    assert compare_sample_data(committed, copy) == [f"{ct}: 1 voxels differ (by up to 2)",
                                                    f"{derm}: 1 pixel values differ (by up to 40)"]


def test_images_may_differ_by_one_unit_in_a_few_values_labels_not_at_all(tmp_path: Path):
    """Another CPU's float rounding moves a value on a .5 boundary by one grey level: tolerated in at most one
    image value in 10,000; a label map must be equal."""
    committed = REPO / "sample_data"
    copy = tmp_path / "copy"
    shutil.copytree(committed, copy)
    image, label = "derm2d/imagesTr/derm_002.png", "derm2d/labelsTr/derm_002.png"

    def nudge(count: int):
        def change(pixels):
            flat = pixels.reshape(-1)
            flat[:count] = np.where(flat[:count] < 255, flat[:count] + 1, flat[:count] - 1)
        return change

    _reencode_png(copy / image, nudge(1))
    assert compare_sample_data(committed, copy) == []
    _reencode_png(copy / label, nudge(1))
    assert compare_sample_data(committed, copy) == [f"{label}: 1 pixel values differ (by up to 1)"]
    shutil.copy(committed / label, copy / label)
    shutil.copy(committed / image, copy / image)
    _reencode_png(copy / image, nudge(500))  # 1 % of the values: not rounding
    assert compare_sample_data(committed, copy) == [f"{image}: 500 pixel values differ (by up to 1)"]


def test_content_check_catches_moved_geometry_and_missing_files(tmp_path: Path):
    committed = REPO / "sample_data"
    copy = tmp_path / "copy"
    shutil.copytree(committed, copy)
    name = "ct3d/imagesTs/ct_013.nii.gz"

    def shift(data, affine):
        affine[0, 3] += 0.01  # 10 micrometres: above the 1e-4 mm geometry tolerance

    _reencode_nifti(copy / name, shift)
    (copy / "derm2d/labelsTs/derm_015.png").unlink()
    problems = compare_sample_data(committed, copy)
    assert problems[0] == "derm2d/labelsTs/derm_015.png: missing"
    assert len(problems) == 2 and problems[1].startswith(f"{name}: sform differs by 0.01 mm")


def test_ct_cases_have_documented_properties(tiny_dataset: Path):
    ds = load_dataset(tiny_dataset)
    assert ds.labels == {0: "background", 1: "organ", 2: "lesion"}
    flipped = 0
    for case in ds.training + ds.test:
        image, label = read_nifti(case.image), read_nifti(case.label)
        assert image.same_grid(label)
        assert image.array.dtype == np.int16 and label.array.dtype == np.uint8
        sx, sy, sz = image.spacing
        assert 0.6 <= sx <= 1.0 and abs(sx - sy) < 1e-6 and 2.0 <= sz <= 5.0
        assert set(np.unique(label.array)) <= {0, 1, 2} and (label.array == 1).sum() > 1000
        assert image.array.min() <= -990  # air around the body
        hu_organ = image.array[label.array == 1].mean()
        hu_lesion = image.array[label.array == 2].mean() if (label.array == 2).any() else None
        assert 80 < hu_organ < 140
        if hu_lesion is not None:
            assert hu_lesion < hu_organ - 20  # hypodense
        flipped += int((np.diag(image.affine)[:3] < 0).any())
    assert flipped > 0


def test_lesions_lie_inside_the_organ_region():
    rng = np.random.default_rng([0, 0, 5])  # a case with lesions
    vol = make_ct_case(rng)
    label = vol.array[1]
    assert (label == 2).sum() > 0
    # every lesion voxel is surrounded by organ or lesion (no lesion touches background directly at its centre)
    from scipy import ndimage

    lesion_core = ndimage.binary_erosion(label == 2)
    assert not (lesion_core & (label == 0)).any()


def test_derm_cases_are_rgb_with_binary_masks(tmp_path: Path):
    root = write_sample_data(tmp_path, cases=4, seed=0, kinds=("derm2d",))["derm2d"]
    for img_path in sorted((root / "imagesTr").glob("*.png")):
        rgb = np.asarray(Image.open(img_path))
        mask = np.asarray(Image.open(root / "labelsTr" / img_path.name))
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
        assert mask.shape == rgb.shape[:2] and set(np.unique(mask)) == {0, 1}
        lesion, skin = rgb[mask == 1].mean(), rgb[mask == 0].mean()
        assert lesion < skin  # pigmented lesion is darker than skin
