"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds model, optimizer, scheduler and AMP-scaler state, epoch and step, best metric and epoch,
the history so far, the MLflow run ID, and every random state the run draws from: Python, NumPy, torch (CPU and
CUDA), the data sampler's generator and every generator inside the random MONAI transforms. All values are tensors or plain
Python types, so :func:`load_checkpoint` uses ``torch.load(weights_only=True)``. Writes are atomic (temporary
file, fsync, rename): a crash or a full disk while writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import TrainingError
from medseg.fsutil import atomic_torch_save, load_tensors

LAST = "last.pt"


def _numpy_state_to_tensor(state: Any) -> dict[str, Any]:  # RandomState.get_state()'s legacy tuple
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_tensor(state: dict[str, Any]) -> tuple:
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["cached"])


def random_states(transform: Any) -> list[np.random.RandomState]:
    """Every NumPy generator reachable from a (possibly nested) MONAI transform, each once, in a stable order.

    MONAI dictionary transforms wrap array transforms that hold generators of their own (``RandAffined`` ->
    ``RandAffine`` -> ``RandAffineGrid``), so the whole attribute tree is walked, not just ``transform.R``.
    """
    found: list[np.random.RandomState] = []
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> None:
        if depth > 6 or id(obj) in seen or isinstance(obj, (torch.Tensor, np.ndarray, str, bytes, int, float)):
            return
        seen.add(id(obj))
        if isinstance(obj, np.random.RandomState):
            found.append(obj)
            return
        if isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item, depth + 1)
            return
        attributes = getattr(obj, "__dict__", None)
        if attributes and type(obj).__module__.split(".")[0] in ("monai", "medseg"):
            for name in sorted(attributes):
                walk(attributes[name], depth + 1)

    walk(transform, 0)
    return found


def capture_rng(transform: Any, sampler: torch.Generator) -> dict[str, Any]:
    """All random states of a run, as checkpoint-safe values."""
    py_version, py_state, py_gauss = random.getstate()
    return {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": _numpy_state_to_tensor(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "sampler": sampler.get_state(),
        "transforms": [_numpy_state_to_tensor(r.get_state()) for r in random_states(transform)],
    }


def restore_rng(state: dict[str, Any], transform: Any, sampler: torch.Generator) -> None:
    """Restores what :func:`capture_rng` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    np.random.set_state(_numpy_state_from_tensor(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    sampler.set_state(state["sampler"])
    generators = random_states(transform)
    if len(generators) != len(state["transforms"]):
        raise TrainingError(
            "RESUME_MISMATCH",
            f"checkpoint holds {len(state['transforms'])} transform random states, the pipeline has {len(generators)}",
            "resume with the run's own configuration",
        )
    for generator, saved in zip(generators, state["transforms"]):
        generator.set_state(_numpy_state_from_tensor(saved))


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Writes a checkpoint atomically."""
    return atomic_torch_save(state, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Loads a checkpoint with ``weights_only=True``.

    Raises:
        TrainingError: ``CHECKPOINT_NOT_FOUND`` or ``CHECKPOINT_UNREADABLE``.
    """
    if not path.is_file():
        raise TrainingError("CHECKPOINT_NOT_FOUND", f"no checkpoint at {path}", "train without --resume first")
    return load_tensors(path, "CHECKPOINT_UNREADABLE", "checkpoint", TrainingError)
