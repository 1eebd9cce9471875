"""The preprocessed-case cache: a second epoch reads no raw file and runs no resampling; a changed plan rebuilds."""

from pathlib import Path

import medseg.transforms.pipeline as pipeline
from medseg.config import load_config
from medseg.io.dataset import load_dataset
from medseg.plan.fingerprint import compute_fingerprint
from medseg.plan.planner import apply_plan, make_plan
from medseg.training.data import CaseDataset, PreprocessedCache
from medseg.transforms.pipeline import build_augment_transforms, build_preprocess_transforms
from medseg.transforms.pipeline import preprocessing_hash as preprocessing_spec


def _setup(tiny_dataset: Path, cache_dir: Path, overrides: list[str]):
    ds = load_dataset(tiny_dataset)
    cfg = load_config("smoke", [f"data.dataset={tiny_dataset}", *overrides])
    plan = make_plan(compute_fingerprint(ds), cfg.plan, on_gpu=False)
    cfg = apply_plan(cfg, plan)
    items = [{"image": str(c.image), "label": str(c.label), "case_id": c.id} for c in ds.training]
    cache = PreprocessedCache(build_preprocess_transforms(cfg, plan), cfg.data.cache, cache_dir, preprocessing_spec(cfg, plan))
    return CaseDataset(items, cache, build_augment_transforms(cfg)), cache


def test_second_epoch_reads_no_raw_file_and_resamples_nothing(tiny_dataset: Path, tmp_path: Path, monkeypatch):
    calls = {"read": 0, "resample": 0}
    real_read = pipeline.read_volume
    monkeypatch.setattr(pipeline, "read_volume", lambda p: (calls.__setitem__("read", calls["read"] + 1), real_read(p))[1])
    real_spacing = pipeline.Spacingd.__call__

    def counting_spacing(self, data, *args, **kwargs):
        calls["resample"] += 1
        return real_spacing(self, data, *args, **kwargs)

    monkeypatch.setattr(pipeline.Spacingd, "__call__", counting_spacing)
    dataset, cache = _setup(tiny_dataset, tmp_path / "cache", [])
    for i in range(len(dataset)):  # epoch 1
        dataset[i]
    assert cache.computed == 3 and calls == {"read": 6, "resample": 3}  # image + label per case
    dataset2, cache2 = _setup(tiny_dataset, tmp_path / "cache", [])  # a new run / worker: disk cache only
    for _ in range(2):  # epochs 2 and 3
        for i in range(len(dataset2)):
            sample = dataset2[i][0]
            assert tuple(sample["image"].shape[1:]) == (16, 16, 8)
    assert cache2.computed == 0 and cache2.loaded == 6
    assert calls == {"read": 6, "resample": 3}


def test_changed_plan_or_settings_rebuild(tiny_dataset: Path, tmp_path: Path):
    dataset, cache = _setup(tiny_dataset, tmp_path / "cache", [])
    dataset[0]
    again, cache_again = _setup(tiny_dataset, tmp_path / "cache", ["data.spacing=[4.0, 4.0, 6.0]"])
    again[0]
    assert cache_again.computed == 1 and cache_again.loaded == 0
    clahe, cache_clahe = _setup(tiny_dataset, tmp_path / "cache", ["data.clahe.enabled=true"])
    clahe[0]
    assert cache_clahe.computed == 1
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3


def test_memory_and_no_cache_modes(tiny_dataset: Path, tmp_path: Path):
    memory, cache = _setup(tiny_dataset, None, ["data.cache=memory"])
    memory[0], memory[0]
    assert cache.computed == 1
    none, cache_none = _setup(tiny_dataset, None, ["data.cache=none"])
    none[0], none[0]
    assert cache_none.computed == 2


def test_cached_case_equals_fresh_preprocessing(tiny_dataset: Path, tmp_path: Path):
    import torch

    _, cache = _setup(tiny_dataset, tmp_path / "c", [])
    item = {"image": str(tiny_dataset / "imagesTr" / "ct_000.nii.gz"), "label": str(tiny_dataset / "labelsTr" / "ct_000.nii.gz"), "case_id": "ct_000"}
    fresh = cache.get(item)
    _, cache2 = _setup(tiny_dataset, tmp_path / "c", [])
    cached = cache2.get(item)
    assert cache2.loaded == 1
    assert torch.equal(fresh["image"].as_tensor(), cached["image"].as_tensor())
    assert torch.equal(fresh["label"].as_tensor(), cached["label"].as_tensor())
    assert torch.allclose(fresh["image"].affine, cached["image"].affine)


def test_worker_processes_load_batches(tiny_dataset: Path, tmp_path: Path):
    from monai.data import DataLoader

    dataset, _ = _setup(tiny_dataset, tmp_path / "cache", [])
    dataset[0]  # fill one case; the workers compute the others and share the disk cache
    loader = DataLoader(dataset, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    assert sum(b["image"].shape[0] for b in batches) == 3
    assert tuple(batches[0]["image"].shape[1:]) == (1, 16, 16, 8)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3
