"""Distributed data-parallel training under ``torchrun`` (NCCL on GPUs, gloo on CPU).

``torchrun --nproc-per-node N -m medseg train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; each process
trains on its own random batches (sampler seeded with ``seed + rank``), gradients are averaged by DDP, and only
rank 0 validates, checkpoints, writes the model folder and logs to MLflow. Stop decisions (non-finite loss, early
stopping) are agreed across ranks so that no process waits forever on the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Joins the ``torchrun`` process group if there is one (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is true on any rank."""
    if not info.enabled:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def barrier(info: DistInfo) -> None:
    """Waits for every rank (no-op for one process)."""
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leaves the process group."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def gather(obj: object, info: DistInfo) -> list:
    """Every rank's ``obj`` in rank order (on every rank); ``[obj]`` for one process."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def from_main(value: float, info: DistInfo) -> float:
    """Rank 0's ``value`` on every rank (``value`` itself for one process)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return float(box[0])
