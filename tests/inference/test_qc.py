"""Reference-free QC: agreement, uncertainty, plausibility, the verdict, temperature scaling, the uncertainty map.

Agreement and component counts are checked against numpy / scikit-image computed independently; the verdict
against inputs built to fail one check (wrong modality, empty prediction)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from skimage import measure

from medseg.inference.predictor import Member, Predictor
from medseg.inference.runner import RunOptions, predict_files
from medseg.io.readers import read_volume
from medseg.io.volume import Volume
from medseg.plan.statistics import count_components, label_stats
from medseg.qc.assess import PLAUSIBILITY
from medseg.qc.reference import fit_temperature
from medseg.qc.signals import QcAccumulator


def _test_image(tiny_dataset: Path) -> Path:
    return sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]


def _mr_like(volume: Volume) -> Volume:
    """The same anatomy as an MR-like image: positive arbitrary units, soft-tissue contrast inverted, air ~ 0."""
    data = volume.array.astype(np.float32)
    return volume.with_array(np.where(data > -500, 900 - 2.0 * (data - 40), 20.0).astype(np.float32))


def _threshold_member(base: Member, threshold: float | None) -> Member:
    """A member whose network says 'organ' where the normalised intensity exceeds ``threshold`` (None: never)."""

    def backend(x: torch.Tensor) -> torch.Tensor:
        organ = 20.0 * (x[:, :1] - threshold) if threshold is not None else torch.full_like(x[:, :1], -20.0)
        return torch.cat([torch.zeros_like(organ), organ, torch.full_like(organ, -20.0)], dim=1)

    return Member(backend, base.cfg, base.plan, base.info, base.model_dir)


def _three_region_volume(predictor: Predictor, values=(-100.0, 60.0, 200.0)) -> tuple[Volume, np.ndarray]:
    """Background / middle / high intensity regions on the model's own grid (no resampling)."""
    region = np.zeros((40, 36, 24), np.uint8)
    region[8:30, 6:30, 4:20] = 1
    region[14:24, 12:24, 8:16] = 2
    data = np.choose(region, values).astype(np.float32)[None]
    return Volume(data, np.diag([*predictor.members[0].spacing, 1.0])), region


def test_model_folder_records_the_training_reference_and_a_fitted_temperature(smoke_model: Path):
    info = json.loads((smoke_model / "model.json").read_text())
    qc = info["qc"]
    assert qc["n_cases"] == 3 and set(qc["labels"]) == {"organ", "lesion"}
    organ = qc["labels"]["organ"]
    assert organ["present"] == 1.0 and 0 < organ["volume_ml"][0] <= organ["volume_ml"][1]
    assert organ["components"][0] >= 1 and len(qc["spacing_mm"]) == 2 and len(qc["intensity"]) == 1
    assert qc["intensity"][0]["p01"][0] < -500  # air in every synthetic CT
    assert 0.25 <= qc["temperature"] <= 8.0 and qc["nll_after"] <= qc["nll_before"]
    assert qc["calibration_cases"] >= 1


def test_identical_ensemble_members_agree_fully(smoke_model: Path, tiny_dataset: Path):
    predictor = Predictor.from_model_dir([smoke_model, smoke_model], "cpu")
    qc = predictor.predict_case(read_volume(_test_image(tiny_dataset)), qc=True).qc
    assert qc["signals"]["agreement"]["ensemble"] == {"organ": 1.0, "lesion": 1.0}
    assert not any(r["code"] == "AGREEMENT" for r in qc["reasons"])


def test_a_known_disagreement_gives_the_expected_pairwise_dice(smoke_model: Path):
    base = Predictor.from_model_dir(smoke_model, "cpu")
    low, mid, high = base._normalize[0](torch.tensor([[-100.0, 60.0, 200.0]])).reshape(-1).tolist()
    members = [_threshold_member(base.members[0], (low + mid) / 2), _threshold_member(base.members[0], (mid + high) / 2)]
    predictor = Predictor(members, torch.device("cpu"), tta=False)
    volume, region = _three_region_volume(predictor)
    prediction = predictor.predict_case(volume, qc=True)
    wide, narrow = region >= 1, region == 2
    expected = 2 * np.logical_and(wide, narrow).sum() / (wide.sum() + narrow.sum())  # 0.38 here
    assert prediction.qc["signals"]["agreement"]["ensemble"]["organ"] == pytest.approx(expected, abs=1e-3)
    assert prediction.qc["signals"]["agreement"]["ensemble"]["lesion"] == 1.0  # both empty: they agree
    assert any(r["code"] == "AGREEMENT" and r["label"] == "organ" for r in prediction.qc["reasons"])
    plausibility = sum(r["code"] in PLAUSIBILITY for r in prediction.qc["reasons"])  # this toy image is odd, too
    assert prediction.qc["verdict"] == "review"
    assert prediction.qc["score"] == pytest.approx(expected * 0.5 ** plausibility, abs=1e-3)


def test_mirrored_predictions_of_a_pointwise_network_agree_fully(smoke_model: Path):
    base = Predictor.from_model_dir(smoke_model, "cpu")
    low, mid, _ = base._normalize[0](torch.tensor([[-100.0, 60.0, 200.0]])).reshape(-1).tolist()
    predictor = Predictor([_threshold_member(base.members[0], (low + mid) / 2)], torch.device("cpu"), tta=True)
    qc = predictor.predict_case(_three_region_volume(predictor)[0], qc=True).qc
    assert qc["signals"]["agreement"]["tta"]["organ"] == 1.0


def test_accumulator_pairwise_dice_matches_numpy_over_slabs():
    rng = np.random.default_rng(3)
    maps = [rng.integers(0, 3, (6, 5, 8)) for _ in range(3)]  # three units' label maps, 3 classes
    acc = QcAccumulator(3, {"ensemble": 3})
    for z0, z1 in ((0, 3), (3, 8)):  # two slabs
        extra = torch.cat([torch.nn.functional.one_hot(torch.as_tensor(m[..., z0:z1]), 3).permute(3, 0, 1, 2).float()
                           for m in maps])
        mean = extra.reshape(3, 3, *extra.shape[1:]).mean(0)
        acc.add(mean, mean.argmax(0), extra)
    result = acc.result({0: "bg", 1: "a", 2: "b"})["agreement"]["ensemble"]
    for lab, name in ((1, "a"), (2, "b")):
        pairs = [(i, j) for i in range(3) for j in range(i + 1, 3)]
        want = np.mean([2 * ((maps[i] == lab) & (maps[j] == lab)).sum() / ((maps[i] == lab).sum() + (maps[j] == lab).sum())
                        for i, j in pairs])
        assert result[name] == pytest.approx(want, abs=1e-4)


def test_wrong_modality_is_reviewed_for_its_intensities(smoke_model: Path, tiny_dataset: Path):
    predictor = Predictor.from_model_dir(smoke_model, "cpu")
    ct = read_volume(_test_image(tiny_dataset))
    clean = predictor.predict_case(ct, qc=True).qc
    assert not any(r["code"] == "INTENSITY" for r in clean["reasons"])  # the check can pass
    mr = predictor.predict_case(_mr_like(ct), qc=True).qc
    assert mr["verdict"] == "review"
    intensity = [r for r in mr["reasons"] if r["code"] == "INTENSITY"]
    assert intensity and "unlike the training scans" in intensity[0]["text"]
    assert mr["score"] < clean["score"]


def test_an_empty_prediction_is_reviewed_as_empty(smoke_model: Path, tiny_dataset: Path):
    base = Predictor.from_model_dir(smoke_model, "cpu")
    predictor = Predictor([_threshold_member(base.members[0], None)], torch.device("cpu"))
    qc = predictor.predict_case(read_volume(_test_image(tiny_dataset)), qc=True).qc
    assert qc["verdict"] == "review"
    empty = [r for r in qc["reasons"] if r["code"] == "EMPTY"]
    assert [r["label"] for r in empty] == ["organ"]  # present in every training case; lesion in fewer
    assert qc["signals"]["volumes_ml"]["organ"] == 0.0


def test_qc_off_gives_no_verdict_and_the_same_labels(smoke_model: Path, tiny_dataset: Path):
    predictor = Predictor.from_model_dir(smoke_model, "cpu")
    volume = read_volume(_test_image(tiny_dataset))
    on, off = predictor.predict_case(volume, qc=True), predictor.predict_case(volume, qc=False)
    assert off.qc is None and on.qc is not None
    assert np.array_equal(on.labels.array, off.labels.array)


def test_label_stats_components_match_scikit_image():
    rng = np.random.default_rng(0)
    labels = (rng.random((24, 20, 12)) > 0.93).astype(np.uint8) * rng.integers(1, 3, (24, 20, 12)).astype(np.uint8)
    stats = label_stats(labels, 0.5, [1, 2, 3])
    for lab in (1, 2):
        assert stats[lab]["components"] == measure.label(labels == lab, connectivity=3).max()
        assert stats[lab]["volume_ml"] == pytest.approx((labels == lab).sum() * 0.5)
    assert stats[3] == {"volume_ml": 0.0, "components": 0, "touches_border": False}
    for mask in (np.asfortranarray(labels == 1), labels[::-1, :, ::2] == 2, labels[:, :, 5] == 1, labels[3] == 2):
        assert count_components(mask) == measure.label(mask, connectivity=mask.ndim).max()  # 2D and 3D, any layout
    inner = np.zeros((10, 10, 10), np.uint8)
    inner[3:6, 3:6, 3:6] = 1
    assert not label_stats(inner, 1.0, [1])[1]["touches_border"]
    inner[0, 4, 4] = 1
    assert label_stats(inner, 1.0, [1])[1]["touches_border"]


def test_temperature_recovers_a_known_overconfidence():
    rng = np.random.default_rng(1)
    z = torch.as_tensor(rng.normal(0, 1.5, (3, 40, 40, 20)), dtype=torch.float32)  # calibrated logits
    probs = torch.softmax(z, 0).reshape(3, -1).T.numpy()
    labels = (rng.random(len(probs))[:, None] > np.cumsum(probs, axis=1)).sum(1).reshape(40, 40, 20)
    fitted = fit_temperature([3.0 * z], [labels])  # a network three times too confident
    assert fitted["temperature"] == pytest.approx(3.0, rel=0.12)
    assert fitted["nll_after"] < fitted["nll_before"]


def test_uncertainty_map_has_the_input_geometry_and_reads_back_as_0_to_1(smoke_model: Path, tiny_dataset: Path,
                                                                         tmp_path: Path):
    image = _test_image(tiny_dataset)
    volume = read_volume(image)
    prediction = Predictor.from_model_dir(smoke_model, "cpu").predict_case(volume, uncertainty=True)
    assert prediction.uncertainty.array.shape == volume.array.shape
    assert np.allclose(prediction.uncertainty.affine, volume.affine)
    predictor = Predictor.from_model_dir(smoke_model, "cpu")
    options = RunOptions(save_uncertainty=True, preview=True, stats=True, progress=False)
    (result,) = predict_files(predictor, [image], tmp_path / "pred", options=options)
    assert result.status == "ok" and result.qc["verdict"] in ("ok", "review")
    written = nib.load(tmp_path / "pred" / result.outputs["uncertainty"]["file"])
    assert written.get_data_dtype() == np.uint8 and written.shape == volume.spatial_shape
    assert np.allclose(written.affine, volume.affine, atol=1e-4)
    values = written.get_fdata()
    assert values.min() >= 0 and values.max() <= 1.0 + 1e-6 and values.max() > 0.05
    manifest = json.loads((tmp_path / "pred" / "manifest.json").read_text())
    assert manifest["n_review"] == int(result.qc["verdict"] == "review")
    from PIL import Image

    with Image.open(tmp_path / "pred" / result.outputs["preview"]["file"]) as preview:
        assert preview.height > 400  # two rows: prediction, uncertainty


def test_border_share_decides_what_rarely_touching_the_border_means():
    from medseg.config import load_config
    from medseg.qc.assess import assess

    settings = load_config(None).inference.qc
    reference = {"labels": {"organ": {"present": 1.0, "volume_ml": [1.0, 100.0], "components": [1, 1],
                                      "touches_border": 0.1}}}
    stats = {"organ": {"volume_ml": 10.0, "components": 1, "touches_border": True}}

    def border_reasons(share: float) -> list:
        result = assess(reference, stats, [], [1.0, 1.0, 1.0], {}, settings.model_copy(update={"border_share": share}))
        return [r for r in result["reasons"] if r["code"] == "BORDER"]

    assert border_reasons(0.05) == []  # 10 % of the training cases touched it: not rare at 5 %
    assert len(border_reasons(0.2)) == 1 and border_reasons(0.2)[0]["label"] == "organ"


@pytest.mark.parametrize("temperature, chunk", [(None, 1 << 21), (1.0, 1 << 21), (1.7, 700), (0.6, 1)])
def test_entropy_sums_on_candidate_voxels_equal_the_whole_slab_computation(temperature, chunk, monkeypatch):
    """QC computes the entropy (and, from logits, the softmax) only where some label's region can be, a few planes
    at a time; the per-label sums must equal numpy's over every voxel."""
    monkeypatch.setattr("medseg.qc.signals.CHUNK_VOXELS", chunk)  # 700: two planes per piece; 1: one plane
    rng = np.random.default_rng(5)
    k, shape = 4, (24, 20, 12)
    logits = rng.normal(0, 3, (k, *shape)).astype(np.float32)
    logits[0] += 6 * (rng.random(shape) < 0.8)  # mostly confident background, as in a CT
    scores = torch.from_numpy(logits) if temperature else torch.softmax(torch.from_numpy(logits), 0)
    p = torch.softmax(torch.from_numpy(logits) / (temperature or 1.0), 0).numpy().astype(np.float64)
    labels = p.argmax(0)
    entropy = -(p * np.log(np.clip(p, 1e-7, None))).sum(0) / np.log(k)
    fast, full = QcAccumulator(k), QcAccumulator(k)
    for z0, z1 in ((0, 5), (5, 12)):
        part = (slice(None), slice(None), slice(None), slice(z0, z1))
        lab = torch.from_numpy(labels[part[1:]].astype(np.uint8))
        assert fast.add(scores[part], lab, None, temperature=temperature) is None
        slab_entropy = full.add(scores[part], lab, None, temperature=temperature, entropy_map=True)
        assert slab_entropy is not None
        np.testing.assert_allclose(slab_entropy.numpy(), entropy[part[1:]], atol=1e-5)
    for lab in range(1, k):
        region = (labels == lab) | (p[lab] >= 0.1)
        assert 0 < region.sum() < region.size
        assert fast.entropy_count[lab] == full.entropy_count[lab] == region.sum()
        assert fast.entropy_sum[lab] == pytest.approx(entropy[region].sum(), rel=1e-5)
        assert full.entropy_sum[lab] == pytest.approx(entropy[region].sum(), rel=1e-5)
