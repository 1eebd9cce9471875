"""Trainer overhead and data-loading cost, on the organ3d_unet plan for the shipped 3D sample data.

    .venv/bin/python benchmarks/training.py [--iters 15] [--device cpu|cuda]

(a) medseg's training step (median per-iteration time, alternating rounds) (the loop body of medseg.training.trainer.fit: forward, loss, backward, clipping,
    optimizer and scheduler steps, finiteness check, loss.item()) vs a plain PyTorch loop (zero_grad, forward,
    loss, backward, step) with the same network, loss, batch and pre-loaded tensors; target ratio >= 0.95.
(b) iterations/s with real loading (cached preprocessing + augmentation, num_workers 0) vs pre-loaded dummy tensors.
On CUDA the step runs with mixed precision (bf16 where supported) as in training.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import save

from medseg.config import load_config
from medseg.io.dataset import load_dataset
from medseg.losses import build_loss
from medseg.models import build_model
from medseg.plan.fingerprint import compute_fingerprint
from medseg.plan.planner import apply_plan, make_plan
from medseg.training.data import CaseDataset, PreprocessedCache
from medseg.training.optim import lr_factor
from medseg.training.trainer import train_step as _step
from medseg.transforms.pipeline import build_augment_transforms, build_preprocess_transforms
from medseg.transforms.pipeline import preprocessing_hash as preprocessing_spec

ROOT = Path(__file__).resolve().parents[1]


def _setup(cfg, device):
    torch.manual_seed(0)
    net = build_model(cfg.model, 3, 1, 3).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return net, build_loss(cfg.loss), optimizer


def _batches(cfg, n, device):
    from monai.data import MetaTensor

    g = torch.Generator().manual_seed(0)
    shape = (cfg.train.batch_size, 1, *cfg.data.patch_size)
    return [{"image": MetaTensor(torch.randn(shape, generator=g)).to(device),
             "label": MetaTensor(torch.randint(0, 3, shape, generator=g).float()).to(device), "case_id": ["x"] * shape[0]}
            for _ in range(n)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_rate(times: list[float]) -> float:
    times = sorted(times)
    return 1.0 / times[len(times) // 2]


def medseg_rate(cfg, batches, device, warmup=3) -> float:
    net, loss_fn, optimizer = _setup(cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    use_amp = device.type == "cuda"
    dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    net.train()
    times = []
    for i, batch in enumerate(batches):
        _sync(device)
        start = time.perf_counter()
        loss = _step(net, loss_fn, optimizer, scaler, scheduler, batch, cfg, device, use_amp, dtype)
        bool(torch.isfinite(loss)), loss.item()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return _median_rate(times)


def plain_rate(cfg, batches, device, warmup=3) -> float:
    net, loss_fn, optimizer = _setup(cfg, device)
    use_amp = device.type == "cuda"
    dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    net.train()
    times = []
    for i, batch in enumerate(batches):
        _sync(device)
        start = time.perf_counter()
        image, label = batch["image"].as_tensor(), batch["label"].as_tensor()
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            loss = loss_fn(net(image), label)
        loss.backward()
        optimizer.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return _median_rate(times)


def real_loading_rate(cfg, plan, ds, device, iters, warmup=3) -> float:
    from monai.data import DataLoader

    items = [{"image": str(c.image), "label": str(c.label), "case_id": c.id} for c in ds.training]
    with tempfile.TemporaryDirectory() as tmp:
        cache = PreprocessedCache(build_preprocess_transforms(cfg, plan), "disk", Path(tmp), preprocessing_spec(cfg, plan))
        dataset = CaseDataset(items, cache, build_augment_transforms(cfg))
        for item in items:
            cache.get(item)  # warm the cache, as after the first epoch
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=iters * cfg.train.batch_size)
        batches = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=0)
        net, loss_fn, optimizer = _setup(cfg, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        use_amp = device.type == "cuda"
        dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        for i, batch in enumerate(batches):
            if i == warmup:
                _sync(device)
                start = time.perf_counter()
            _step(net, loss_fn, optimizer, scaler, scheduler, batch, cfg, device, use_amp, dtype).item()
        _sync(device)
        return (iters - warmup) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    ds = load_dataset(ROOT / "sample_data" / "ct3d")
    cfg = load_config("organ3d_unet", [f"data.dataset={ds.root}"])
    plan = make_plan(compute_fingerprint(ds), cfg.plan, on_gpu=device.type == "cuda")
    cfg = apply_plan(cfg, plan)
    batches = _batches(cfg, args.iters, device)
    plains, ours_all = [], []
    for _ in range(args.rounds):  # alternate, so that drifts of a shared machine hit both alike
        plains.append(plain_rate(cfg, batches, device))
        ours_all.append(medseg_rate(cfg, batches, device))
    plain, ours = sorted(plains)[len(plains) // 2], sorted(ours_all)[len(ours_all) // 2]
    real = real_loading_rate(cfg, plan, ds, device, args.iters)
    result = {
        "what": "organ3d_unet plan on sample_data/ct3d; iterations/s after 3 warm-up iterations",
        "device": str(device),
        "amp": device.type == "cuda",
        "patch_size": list(cfg.data.patch_size), "batch_size": cfg.train.batch_size, "channels": list(cfg.model.channels),
        "method": f"median per-iteration time over {args.iters} iterations, median of {args.rounds} alternating rounds",
        "plain_pytorch_it_per_s": round(plain, 3), "plain_rounds": [round(v, 3) for v in plains],
        "medseg_step_it_per_s": round(ours, 3), "medseg_rounds": [round(v, 3) for v in ours_all],
        "ratio_medseg_over_plain": round(ours / plain, 3), "target_ratio": 0.95,
        "real_loading_it_per_s": round(real, 3),
        "ratio_real_loading_over_dummy_tensors": round(real / ours, 3),
        "cuda_note": None if torch.cuda.is_available() else "no CUDA GPU on this machine: no AMP/GPU figures",
    }
    save(f"training_{device.type}", result)


if __name__ == "__main__":
    main()
