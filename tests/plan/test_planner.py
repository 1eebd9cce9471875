import json

import numpy as np
import pytest

from medseg.config import load_config
from medseg.io.dataset import load_dataset
from medseg.io.nifti import read_nifti
from medseg.plan.fingerprint import Fingerprint, compute_fingerprint
from medseg.plan.planner import Plan, apply_plan, estimate_memory_gb, make_plan

PLAN_CFG = load_config(None).plan


def _fp(spacings, shapes, modality=None, dims=3) -> Fingerprint:
    stats = {"p00_5": -50.0, "p99_5": 250.0, "mean": 100.0, "std": 30.0, "min": -80.0, "max": 300.0}
    modality = modality or {"0": "CT"}
    return Fingerprint("synthetic", modality, {"0": "background", "1": "organ"}, dims, len(modality),
                       spacings, shapes, [stats] * len(modality), {"0": 0.9, "1": 0.1})


def test_median_spacing_is_the_target():
    fp = _fp([[0.7, 0.7, 1.8], [0.8, 0.8, 2.0], [0.9, 0.9, 2.2]], [[100, 100, 40]] * 3)
    plan = make_plan(fp, PLAN_CFG, on_gpu=True)
    assert plan.spacing == [0.8, 0.8, 2.0]
    assert not plan.anisotropic


def test_anisotropic_dataset_keeps_slice_spacing():
    fp = _fp([[0.5, 0.5, 5.0], [0.6, 0.6, 5.0], [0.7, 0.7, 6.0]], [[200, 200, 30]] * 3)
    plan = make_plan(fp, PLAN_CFG, on_gpu=True)
    assert plan.anisotropic and plan.spacing == [0.6, 0.6, 5.0]  # not resampled to 0.6 mm slices
    assert any("anisotropic" in note for note in plan.notes)


def test_patch_fits_the_memory_budget_and_the_network():
    fp = _fp([[1.0, 1.0, 1.0]] * 3, [[256, 256, 256]] * 3)
    for on_gpu, budget in ((True, PLAN_CFG.gpu_memory_gb), (False, PLAN_CFG.cpu_memory_gb)):
        plan = make_plan(fp, PLAN_CFG, on_gpu=on_gpu)
        assert estimate_memory_gb(plan.patch_size, plan.batch_size, PLAN_CFG.base_channels) <= budget
        divisor = 2 ** len(plan.strides)
        assert all(p % divisor == 0 and p // divisor >= 4 for p in plan.patch_size)
        assert len(plan.channels) == len(plan.strides) + 1 and plan.channels[0] == PLAN_CFG.base_channels
    cpu, gpu = make_plan(fp, PLAN_CFG, on_gpu=False), make_plan(fp, PLAN_CFG, on_gpu=True)
    assert np.prod(cpu.patch_size) < np.prod(gpu.patch_size)


def test_small_images_get_whole_image_patches_and_larger_batches():
    fp = _fp([[1.0, 1.0]] * 4, [[64, 48]] * 4, modality={"0": "R", "1": "G", "2": "B"}, dims=2)
    plan = make_plan(fp, PLAN_CFG, on_gpu=True)
    assert plan.dims == 2 and plan.patch_size[0] >= 64 and plan.patch_size[1] >= 48
    assert plan.batch_size > 2 and plan.normalization == ["rgb"] * 3


@pytest.mark.parametrize("modality,scheme", [({"0": "CT"}, "ct"), ({"0": "MRI"}, "zscore"), ({"0": "T2"}, "zscore")])
def test_normalisation_follows_modality(modality, scheme):
    plan = make_plan(_fp([[1.0, 1.0, 1.0]] * 2, [[64, 64, 64]] * 2, modality), PLAN_CFG, on_gpu=True)
    assert plan.normalization == [scheme]


def test_normalisation_is_per_channel_and_applied_per_channel():
    import torch
    from monai.data import MetaTensor

    from medseg.transforms.intensity import normalization

    plan = make_plan(_fp([[1.0, 1.0, 1.0]] * 2, [[32, 32, 32]] * 2, {"0": "CT", "1": "PET"}), PLAN_CFG, on_gpu=True)
    assert plan.normalization == ["ct", "zscore"]
    ct_stats = {"p00_5": -100.0, "p99_5": 300.0, "mean": 50.0, "std": 25.0}
    transform = normalization(load_config(None).data.intensity, plan.normalization, [ct_stats, {}])
    image = MetaTensor(torch.stack([torch.full((4, 4, 4), 1000.0), torch.arange(64.0).reshape(4, 4, 4) + 1]))
    out = transform({"image": image})["image"]
    assert torch.allclose(out[0], torch.full((4, 4, 4), (300.0 - 50.0) / 25.0))  # clipped, then z-scored with CT stats
    assert abs(float(out[1].mean())) < 1e-5 and abs(float(out[1].std(unbiased=False)) - 1) < 1e-4  # per-image z-score


def test_old_single_scheme_plans_still_load():
    old = Plan(3, [1.0, 1.0, 1.0], [64, 64, 64], 2, [16, 32], [2], "ct", {"p00_5": 0.0, "p99_5": 1.0, "mean": 0.0, "std": 1.0},
               False, "x")
    assert old.normalization == ["ct"] and isinstance(old.intensity, list)


def test_fixed_depth_networks():
    plan = make_plan(_fp([[1.0, 1.0]] * 2, [[150, 140]] * 2, dims=2), PLAN_CFG, on_gpu=True, fixed_levels=4)
    assert plan.strides == [2, 2, 2, 2] and len(plan.channels) == 5
    assert all(p % 16 == 0 for p in plan.patch_size)


def test_swinunetr_plans_patches_divisible_by_32():
    from medseg.models import MODELS

    levels = MODELS.get("swinunetr").spec.fixed_levels
    plan = make_plan(_fp([[0.8, 0.8, 2.5]] * 2, [[150, 140, 50]] * 2), PLAN_CFG, on_gpu=False, fixed_levels=levels)
    assert plan.strides == [2] * 5 and all(p % 32 == 0 for p in plan.patch_size)
    cfg = apply_plan(load_config(None, ["model.name=swinunetr"]), plan)
    from medseg.models import build_model

    build_model(cfg.model, 3, 1, 2)  # the planned channels and strides fit the network


def test_pinned_values_win_and_nulls_are_filled():
    plan = make_plan(_fp([[0.8, 0.8, 2.5]] * 2, [[120, 120, 40]] * 2), PLAN_CFG, on_gpu=False)
    pinned = apply_plan(load_config(None, ["data.spacing=[2, 2, 4]", "train.batch_size=3"]), plan)
    assert pinned.data.spacing == (2.0, 2.0, 4.0) and pinned.train.batch_size == 3
    assert pinned.data.patch_size == tuple(plan.patch_size) and pinned.model.channels == tuple(plan.channels)
    assert pinned.data.intensity.scheme is None  # null: the plan's per-channel schemes apply
    free = apply_plan(load_config(None), plan)
    assert free.data.spacing == tuple(plan.spacing) and free.train.batch_size == plan.batch_size


def test_plan_json_round_trip_and_hash():
    plan = make_plan(_fp([[1.0, 1.0, 2.0]] * 2, [[64, 64, 32]] * 2), PLAN_CFG, on_gpu=True)
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.hash() == plan.hash()
    assert json.loads(plan.to_json())["spacing"] == plan.spacing


def test_fingerprint_of_sample_data_matches_direct_measurement(tiny_dataset):
    ds = load_dataset(tiny_dataset)
    fp = compute_fingerprint(ds, samples_per_case=10**9)  # all foreground voxels
    values = np.concatenate([
        read_nifti(c.image).array[0][read_nifti(c.label).array[0] > 0].astype(float) for c in ds.training
    ])
    assert fp.intensity[0]["mean"] == pytest.approx(values.mean())
    assert fp.intensity[0]["clip_high"] == pytest.approx(np.percentile(values, 99.5))
    assert len(fp.spacings) == 3 and fp.dims == 3 and fp.modality == {"0": "CT"}
    # spacings are in RAS order: the slice axis (2-5 mm) is last for every case
    assert all(2.0 <= s[2] <= 5.0 and s[0] < 1.0 for s in fp.spacings)
    assert sum(fp.class_frequency.values()) == pytest.approx(1.0)
    assert Fingerprint.from_json(fp.to_json()) == fp


def test_network_memory_factors_are_the_measured_ones_and_shrink_the_patch():
    """The planner's per-network memory factors are those of benchmarks/results/models.json (peak training memory
    relative to the UNet of the same dimension), and a larger factor gives a smaller patch x batch."""
    from pathlib import Path

    from medseg.models.registry import MODELS, spec_of

    MEMORY_FACTOR = {n: spec_of(n).memory_factor for n in MODELS.names() if spec_of(n).memory_factor != 1.0}
    measured = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "models.json").read_text())["networks"]
    assert set(MEMORY_FACTOR) == {key.rsplit("_", 1)[0] for key in measured} - {"unet"}
    for name, factor in MEMORY_FACTOR.items():
        key = f"{name}_3d" if f"{name}_3d" in measured else f"{name}_2d"
        assert factor == measured[key]["memory_factor_vs_unet"], name
    fp = _fp([[1.0, 1.0, 1.0]] * 3, [[256, 256, 160]] * 3)
    plain = make_plan(fp, PLAN_CFG, on_gpu=False)
    heavy = make_plan(fp, PLAN_CFG, on_gpu=False, memory_factor=MEMORY_FACTOR["swinunetr"])
    assert np.prod(heavy.patch_size) * heavy.batch_size < np.prod(plain.patch_size) * plain.batch_size


def test_clip_percentiles_follow_the_config_and_a_stored_fingerprint_is_remeasured(tiny_dataset, tmp_path):
    from medseg.plan.fingerprint import load_or_compute

    ds = load_dataset(tiny_dataset)
    values = np.concatenate([
        read_nifti(c.image).array[0][read_nifti(c.label).array[0] > 0].astype(float) for c in ds.training
    ])
    fp = compute_fingerprint(ds, samples_per_case=10**9, clip_percentiles=(2.0, 98.0))
    assert fp.intensity[0]["clip_low"] == pytest.approx(np.percentile(values, 2.0))
    assert fp.intensity[0]["clip_high"] == pytest.approx(np.percentile(values, 98.0))
    path = tmp_path / "fingerprint.json"
    assert load_or_compute(ds, path).clip_percentiles == [0.5, 99.5]
    again = load_or_compute(ds, path, (2.0, 98.0))  # the stored one was taken at other percentiles
    assert again.clip_percentiles == [2.0, 98.0] and Fingerprint.from_json(path.read_text()) == again


def test_a_plan_written_with_the_old_percentile_keys_still_normalises():
    import torch

    from medseg.transforms.intensity import normalization

    cfg = load_config(None).data.intensity.model_copy(update={"scheme": None})
    old = {"p00_5": -100.0, "p99_5": 300.0, "mean": 50.0, "std": 25.0}
    new = {"clip_low": -100.0, "clip_high": 300.0, "mean": 50.0, "std": 25.0}
    x = {"image": torch.tensor([[-500.0, 0.0, 50.0, 900.0]])}
    a = normalization(cfg, ["ct"], [old])(dict(x))["image"]
    b = normalization(cfg, ["ct"], [new])(dict(x))["image"]
    assert np.allclose(np.asarray(a), np.asarray(b)) and np.allclose(np.asarray(a)[0, [0, 3]], [-6.0, 10.0])


def test_max_batch_size_and_anisotropy_ratio_are_config_values():
    small = _fp([[1.0, 1.0, 1.0]] * 3, [[24, 24, 24]] * 3)  # the patch covers the image: the batch grows
    assert make_plan(small, PLAN_CFG, on_gpu=True).batch_size == PLAN_CFG.max_batch_size
    assert make_plan(small, PLAN_CFG.model_copy(update={"max_batch_size": 4}), on_gpu=True).batch_size == 4
    fp = _fp([[1.0, 1.0, 2.5]] * 3, [[200, 200, 60]] * 3)  # ratio 2.5
    assert not make_plan(fp, PLAN_CFG, on_gpu=True).anisotropic
    assert make_plan(fp, PLAN_CFG.model_copy(update={"anisotropy_ratio": 2.0}), on_gpu=True).anisotropic
