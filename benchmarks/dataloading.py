"""Training data pipeline throughput and CLAHE 3D time.

    .venv/bin/python benchmarks/dataloading.py [--samples 60]

Measured in one run, on the shipped 3D sample data with the organ3d_unet preset's plan (CPU budget):
  * medseg CaseDataset with a warm disk cache, with a memory cache, and with no cache (preprocessing every draw);
  * MONAI CacheDataset (deterministic part cached in memory) + ThreadDataLoader running the same transforms.
All iterate the same random crops + augmentation, single process (num_workers=0), and report samples/s.
CLAHE: medseg's CLAHE on a 256x256x128 volume vs scikit-image's equalize_adapthist called directly.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import save

from medseg.config import load_config
from medseg.io.dataset import load_dataset
from medseg.plan.fingerprint import compute_fingerprint
from medseg.plan.planner import apply_plan, make_plan
from medseg.training.data import CaseDataset, PreprocessedCache
from medseg.transforms.pipeline import build_augment_transforms, build_preprocess_transforms
from medseg.transforms.pipeline import preprocessing_hash as preprocessing_spec

ROOT = Path(__file__).resolve().parents[1]


def _rate(loader, n_samples: int) -> float:
    seen, start = 0, time.perf_counter()
    while seen < n_samples:
        for batch in loader:
            seen += batch["image"].shape[0]
            if seen >= n_samples:
                break
    return seen / (time.perf_counter() - start)


def pipeline_rates(n_samples: int) -> dict:
    from monai.data import CacheDataset, DataLoader, ThreadDataLoader
    from monai.transforms import Compose

    ds = load_dataset(ROOT / "sample_data" / "ct3d")
    cfg = load_config("organ3d_unet", [f"data.dataset={ds.root}"])
    plan = make_plan(compute_fingerprint(ds), cfg.plan, on_gpu=False)
    cfg = apply_plan(cfg, plan)
    items = [{"image": str(c.image), "label": str(c.label), "case_id": c.id} for c in ds.training]
    pre, aug = build_preprocess_transforms(cfg, plan), build_augment_transforms(cfg)
    spec = preprocessing_spec(cfg, plan)
    out = {"patch_size": list(cfg.data.patch_size), "spacing": list(cfg.data.spacing), "cases": len(items)}
    sampler = lambda: torch.utils.data.RandomSampler(range(len(items)), replacement=True, num_samples=n_samples)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        warm = CaseDataset(items, PreprocessedCache(pre, "disk", Path(tmp), spec), None)
        for i in range(len(items)):
            warm[i]  # fill the disk cache (not timed)
        for mode in ("disk", "memory", "none"):
            dataset = CaseDataset(items, PreprocessedCache(pre, mode, Path(tmp), spec), aug)
            if mode == "memory":
                for i in range(len(items)):
                    dataset.cache.get(items[i])  # fill (not timed), like MONAI's CacheDataset below
            loader = DataLoader(dataset, batch_size=2, sampler=sampler(), num_workers=0)
            out[f"medseg_{mode}_cache_samples_per_s"] = round(_rate(loader, n_samples), 2)
    monai_ds = CacheDataset(items, Compose([*pre.transforms, *aug.transforms]), cache_rate=1.0, progress=False)
    loader = ThreadDataLoader(monai_ds, batch_size=2, sampler=sampler(), num_workers=0)
    out["monai_cachedataset_threadloader_samples_per_s"] = round(_rate(loader, n_samples), 2)
    peer = out["monai_cachedataset_threadloader_samples_per_s"]
    for mode in ("disk", "memory", "none"):
        out[f"ratio_{mode}_cache_over_monai"] = round(out[f"medseg_{mode}_cache_samples_per_s"] / peer, 3)
    out["ratio_disk_cache_over_no_cache"] = round(out["medseg_disk_cache_samples_per_s"] / out["medseg_none_cache_samples_per_s"], 2)
    return out


def clahe_time() -> dict:
    from skimage.exposure import equalize_adapthist

    from medseg.transforms.clahe import CLAHE

    volume = np.random.default_rng(0).normal(40, 200, size=(1, 256, 256, 128)).astype(np.float32)
    start = time.perf_counter()
    CLAHE(clip_limit=0.01)(volume)
    ours = time.perf_counter() - start
    unit = (volume[0] - volume.min()) / (volume.max() - volume.min())
    start = time.perf_counter()
    equalize_adapthist(unit, clip_limit=0.01)
    direct = time.perf_counter() - start
    return {"clahe3d_256x256x128_s": round(ours, 2), "skimage_direct_s": round(direct, 2), "ratio_over_skimage": round(ours / direct, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    save("dataloading", {"what": "training pipeline samples/s (batch 2, num_workers 0) and CLAHE 3D", **pipeline_rates(args.samples), **clahe_time()})


if __name__ == "__main__":
    main()
