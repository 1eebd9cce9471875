"""The reports' viewer files (medseg.inference.viewer_file): what is embedded is checked by reading the embedded
NIfTI files back with nibabel and comparing world positions and values with the input grid's, and the "jump to"
marks against centroids found with scikit-image (not the scipy code that wrote them)."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from skimage.measure import label as sk_label
from skimage.measure import regionprops

from medseg.inference import viewer_file
from medseg.inference.viewer_file import evaluation_marks, prediction_marks, read_viewer, write_viewer


def _embedded(path: Path, role: str) -> nib.Nifti1Image:
    raw = gzip.decompress(base64.b64decode(read_viewer(path)["volumes"][role]))
    return nib.Nifti1Image.from_bytes(raw)


def _oblique(spacing: tuple[float, float, float]) -> np.ndarray:
    a, b = np.radians(25.0), np.radians(12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing) @ np.diag([-1.0, 1.0, -1.0])  # flipped and oblique
    affine[:3, 3] = [120.0, -80.0, 35.0]
    return affine


def test_reduced_grid_keeps_world_positions_values_and_small_lesions(tmp_path: Path):
    """A 520 x 300 x 60 oblique, flipped CT: the embedded grid stays under the voxel budget, each reduced voxel's
    world centre is the mean of its block's input voxel centres, the decoded HU is the block mean (within the
    8-bit step), and a one-voxel lesion survives the reduction."""
    rng = np.random.default_rng(0)
    shape = (520, 300, 60)
    affine = _oblique((0.7, 0.7, 2.5))
    image = rng.normal(40.0, 20.0, shape).astype(np.float32)
    image[:40] = -1000.0  # air: a CT in HU
    labels = np.zeros(shape, np.uint8)
    labels[60:500, 20:290, 5:55] = 1
    labels[301, 151, 31] = 2  # one voxel
    write_viewer(tmp_path / "c.viewer.npz", image, affine, {"prediction": labels}, {1: "organ", 2: "lesion"}, [])
    meta = read_viewer(tmp_path / "c.viewer.npz")["meta"]
    img = _embedded(tmp_path / "c.viewer.npz", "image")
    lab = _embedded(tmp_path / "c.viewer.npz", "prediction")
    assert max(img.shape) <= viewer_file.MAX_AXIS and np.prod(img.shape) <= viewer_file.MAX_VOXELS
    assert img.get_data_dtype() == np.uint8 and lab.get_data_dtype() == np.uint8 and img.shape == lab.shape
    assert meta["modality"] == "CT"
    f = np.array(meta["factors"])
    assert (f > 1).any()
    # the crop: the labels' box plus 20 mm, clipped to the grid
    margin = np.ceil(viewer_file.MARGIN_MM / np.array([0.7, 0.7, 2.5])).astype(int)
    lo = np.maximum(np.array([60, 20, 5]) - margin, 0)
    hu = img.get_fdata()
    for n in [(0, 0, 0), (3, 7, 2), tuple(s - 2 for s in img.shape)]:
        block = [np.arange(lo[a] + n[a] * f[a], lo[a] + (n[a] + 1) * f[a]) for a in range(3)]
        ii, jj, kk = np.meshgrid(*block, indexing="ij")
        centres = nib.affines.apply_affine(affine, np.stack([ii, jj, kk], -1).reshape(-1, 3))
        assert np.allclose(nib.affines.apply_affine(img.affine, n), centres.mean(axis=0), atol=1e-6)
        assert abs(hu[n] - image[ii, jj, kk].mean()) <= viewer_file.CT_STEP_HU / 2 + 1e-3
    # the lesion voxel's world position falls in a reduced voxel labelled 2
    world = nib.affines.apply_affine(affine, [301, 151, 31])
    at = np.rint(nib.affines.apply_affine(np.linalg.inv(lab.affine), world)).astype(int)
    assert lab.get_fdata()[tuple(at)] == 2 and (lab.get_fdata() == 2).sum() == 1


def test_small_volume_is_cropped_not_reduced_and_mr_keeps_its_units(tmp_path: Path):
    affine = np.diag([1.2, 1.0, 3.0, 1.0])
    image = np.linspace(100.0, 900.0, 40 * 50 * 20, dtype=np.float32).reshape(40, 50, 20)
    labels = np.zeros(image.shape, np.uint8)
    labels[18:22, 24:26, 9:11] = 1
    write_viewer(tmp_path / "mr.viewer.npz", image, affine, {"prediction": labels}, {1: "lesion"}, [])
    meta = read_viewer(tmp_path / "mr.viewer.npz")["meta"]
    img = _embedded(tmp_path / "mr.viewer.npz", "image")
    assert meta["modality"] == "other" and meta["factors"] == [1, 1, 1]
    # margin 20 mm: 17 voxels in x, 20 in y, 7 in z
    assert img.shape == (4 + 2 * 17, 2 + 2 * 20, 2 + 2 * 7)
    corner = nib.affines.apply_affine(img.affine, [0, 0, 0])
    assert np.allclose(corner, nib.affines.apply_affine(affine, [18 - 17, 24 - 20, 9 - 7]))
    values = img.get_fdata()
    original = image[1:39, 4:46, 2:18]
    step = (np.percentile(original, 99.5) - np.percentile(original, 0.5)) / 255
    inside = (original > np.percentile(original, 0.5)) & (original < np.percentile(original, 99.5))
    assert np.abs(values - original)[inside].max() <= step / 2 + 1e-3  # the scan's own units, 255 steps


def test_embedded_headers_hold_geometry_only(tmp_path: Path):
    """The embedded NIfTI headers carry no text a source header could have put there (names, descriptions)."""
    labels = np.zeros((10, 10, 4), np.uint8)
    labels[3:6, 3:6, 1:3] = 1
    write_viewer(tmp_path / "c.viewer.npz", np.zeros((10, 10, 4), np.float32), np.eye(4), {"prediction": labels},
                 {1: "lesion"}, [], np.zeros((10, 10, 4), np.uint8))
    for role in read_viewer(tmp_path / "c.viewer.npz")["meta"]["volumes"]:
        header = _embedded(tmp_path / "c.viewer.npz", role).header
        assert all(bytes(header[field]).strip(b"\0 ") == b"" for field in ("descrip", "aux_file", "intent_name", "db_name"))


def test_two_d_pictures_get_a_one_slice_viewer(tmp_path: Path):
    labels = np.zeros((30, 20), np.uint8)
    labels[5:9, 5:9] = 1
    write_viewer(tmp_path / "p.viewer.npz", np.ones((30, 20), np.float32), np.eye(4), {"prediction": labels},
                 {1: "lesion"}, [])
    assert _embedded(tmp_path / "p.viewer.npz", "prediction").shape[2] == 1


def _region_centroids(mask: np.ndarray, affine: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(size, world centroid) of each 26-connected region, by scikit-image."""
    return [(int(r.area), nib.affines.apply_affine(affine, r.centroid)) for r in regionprops(sk_label(mask, connectivity=3))]


def test_evaluation_marks_point_at_disagreement_missed_and_false_lesions():
    affine = _oblique((1.0, 1.2, 2.0))
    ref = np.zeros((40, 40, 20), np.uint8)
    pred = np.zeros_like(ref)
    ref[5:25, 5:25, 2:12] = 1
    pred[8:25, 5:25, 2:12] = 1  # 3 slabs of the organ missed
    ref[30:34, 30:34, 14:17] = 2  # missed lesion
    pred[2:5, 32:35, 15:18] = 2  # false lesion
    ref[30:33, 5:8, 14:16] = 2
    pred[30:33, 5:8, 14:16] = 2  # found lesion
    marks = evaluation_marks(ref, pred, affine, {1: "organ", 2: "lesion"}, overlap=0.1)
    kinds = {(m["label"], m["kind"]): m for m in marks}
    assert set(kinds) == {("organ", "largest disagreement"), ("lesion", "largest disagreement"),
                          ("lesion", "missed lesion"), ("lesion", "false lesion")}
    size, centre = max(_region_centroids((ref == 1) ^ (pred == 1), affine), key=lambda r: r[0])
    assert kinds["organ", "largest disagreement"]["voxels"] == size == 3 * 20 * 10
    assert np.allclose(kinds["organ", "largest disagreement"]["mm"], centre, atol=1e-3)
    [(_, missed)] = [r for r in _region_centroids(ref == 2, affine) if r[0] == 48]
    assert np.allclose(kinds["lesion", "missed lesion"]["mm"], missed, atol=1e-3)
    [(_, false)] = [r for r in _region_centroids(pred == 2, affine) if r[0] == 27]
    assert np.allclose(kinds["lesion", "false lesion"]["mm"], false, atol=1e-3)
    assert [m["voxels"] for m in marks] == sorted((m["voxels"] for m in marks), reverse=True)


def test_prediction_marks_structures_and_most_uncertain_region():
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    pred = np.zeros((20, 20, 10), np.uint8)
    pred[2:8, 2:8, 1:4] = 1
    pred[12:14, 12:14, 6:8] = 1  # a smaller second part
    uncertainty = np.zeros(pred.shape, np.uint8)  # 0..255 for 0..1, as predict keeps it
    uncertainty[15:18, 2:5, 5:9] = 204
    uncertainty[10:12, 10:12, 0:2] = 127  # just under one half: not "uncertain"
    marks = prediction_marks(pred, affine, {1: "liver", 2: "spleen"}, uncertainty)
    assert [(m["label"], m["kind"], m["voxels"]) for m in marks] == [
        ("liver", "structure", 108), ("uncertainty", "most uncertain region", 36)]
    assert np.allclose(marks[0]["mm"], [4.5, 4.5, 4.0]) and np.allclose(marks[1]["mm"], [16.0, 3.0, 13.0])


def test_a_damaged_viewer_file_leaves_the_figure_and_says_so(tmp_path: Path):
    from medseg.reporting.viewer import case_viewer

    (tmp_path / "000.viewer.npz").write_bytes(b"PK\x03\x04 not a zip")
    view = case_viewer(tmp_path / "000.viewer.npz", "evaluation")
    assert "unreadable" in view["error"] and str(tmp_path.parent) not in view["error"]


def test_overlay_record_refuses_a_viewer_path_outside_the_folder(tmp_path: Path):
    from medseg.errors import InputError
    from medseg.reporting.records import Overlays, read_json_record

    for bad in ("../x.viewer.npz", "/etc/x.viewer.npz", "x.npz", ".viewer.npz"):
        record = {"overlays": [{"case": "c", "why": "best", "file": "000.png", "viewer": bad}]}
        (tmp_path / "overlays.json").write_text(json.dumps(record))
        with pytest.raises(InputError):
            read_json_record(tmp_path / "overlays.json", Overlays)


def test_block_reduction_in_chunks_equals_each_block_taken_alone():
    """The chunked block mean/max against each block computed on its own (edge blocks padded by repeating the last
    plane), on a shape that is no multiple of the factors and across chunk boundaries."""
    rng = np.random.default_rng(3)
    data = rng.normal(size=(11, 7, 23)).astype(np.float32)
    labels = rng.integers(0, 4, size=(11, 7, 23)).astype(np.uint8)
    f = np.array([3, 2, 4])
    padded = np.pad(data, [(0, 1), (0, 1), (0, 1)], mode="edge")
    padded_labels = np.pad(labels, [(0, 1), (0, 1), (0, 1)], mode="edge")
    mean = viewer_file._reduce(data, f, "mean", chunk=2)
    top = viewer_file._reduce(labels, f, "max", chunk=2)
    assert mean.shape == top.shape == (4, 4, 6)
    for i, j, k in np.ndindex(mean.shape):
        block = (slice(3 * i, 3 * i + 3), slice(2 * j, 2 * j + 2), slice(4 * k, 4 * k + 4))
        assert mean[i, j, k] == pytest.approx(padded[block].mean(), abs=1e-5)
        assert top[i, j, k] == padded_labels[block].max()
