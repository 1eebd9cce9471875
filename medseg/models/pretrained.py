"""Local pretrained weights (``model.pretrained: PATH``): an encoder or whole-model checkpoint, never downloaded.

Accepted files: ``.safetensors``; or a torch file read with ``torch.load(weights_only=True)`` (no code runs)
holding a state dict, a dict with the state dict under ``state_dict``, ``model``, ``network_weights`` (nnU-Net)
or ``net``, or a medseg model folder (its ``weights.pt``). Keys are matched after dropping the wrapper prefixes
that training tools add (``module.``, ``_orig_mod.``, ``net.``, ``model.``) when that makes more keys match.
Tensors whose key is absent from the network (*unexpected*) or whose shape differs (*mismatched*, e.g. another
number of classes in the last layer) are left out; the network's own tensors that the file lacks (*missing*)
keep their initialisation. The counts and the first keys of each kind are logged and returned
(:class:`PretrainedReport`, written to ``RUN/pretrained.json`` and logged to MLflow).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.errors import ModelError, describe, require_exists
from medseg.fsutil import load_tensors

log = logging.getLogger(__name__)
WRAPPERS = ("module.", "_orig_mod.", "net.", "model.")
NESTED = ("state_dict", "model", "network_weights", "net")


@dataclass
class PretrainedReport:
    """What loading a checkpoint did (names of tensors; lists cut to their first 20 entries)."""

    file: str  # the file's name only (never its folder)
    loaded: int
    total: int  # tensors in the network
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    n_missing: int = 0
    n_unexpected: int = 0
    n_mismatched: int = 0
    prefix_removed: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (see the module docstring for the accepted layouts).

    Raises:
        InputError: ``PATH_NOT_FOUND``.
        ModelError: ``PRETRAINED_UNREADABLE`` when the file is not a safetensors/torch file or holds no tensors
            (a pickled model object is refused: ``weights_only`` never runs code).
    """
    path = Path(path)
    require_exists(path, "pretrained weights")
    if path.is_dir():
        path = path / "weights.pt"
        require_exists(path, "pretrained weights (model folder)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - any failure to parse the file is one error for the user
            raise ModelError("PRETRAINED_UNREADABLE", f"cannot read {path.name}: {describe(exc, path, limit=200)}",
                             "give a .safetensors file or a torch state dict saved with torch.save(model.state_dict())") from None
    else:
        state = load_tensors(path, "PRETRAINED_UNREADABLE", "pretrained weights", ModelError)
    for _ in range(3):  # unwrap {"state_dict": {...}} and the like
        if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            inner = next((state[k] for k in NESTED if isinstance(state.get(k), dict)), None)
            if inner is None:
                break
            state = inner
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise ModelError("PRETRAINED_UNREADABLE", f"{path.name} holds no tensors (no state dict found)",
                         f"expected a state dict, or one under {', '.join(NESTED)}")
    return tensors


def _strip(state: dict[str, torch.Tensor], own: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Drops the wrapper prefixes that make more keys match the network."""
    removed = ""
    for _ in range(len(WRAPPERS)):
        best = None
        for prefix in WRAPPERS:
            if any(k.startswith(prefix) for k in state):
                candidate = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
                if len(own & set(candidate)) > len(own & set(state)):
                    best = (prefix, candidate)
                    break
        if best is None:
            break
        removed += best[0]
        state = best[1]
    return state, removed


def load_pretrained(net: nn.Module, path: str | Path) -> PretrainedReport:
    """Copies the matching tensors of ``path`` into ``net`` (in place) and reports what matched.

    Raises:
        InputError: ``PATH_NOT_FOUND``.
        ModelError: ``PRETRAINED_UNREADABLE``; ``PRETRAINED_MISMATCH`` when not one tensor fits the network
            (another architecture, or another ``model.channels``).
    """
    own = net.state_dict()
    state, removed = _strip(read_state_dict(path), set(own))
    fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    mismatched = sorted(k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in fits)
    name = Path(path).name
    if not fits:
        raise ModelError(
            "PRETRAINED_MISMATCH",
            f"no tensor of {name} fits the network ({len(unexpected)} unexpected, {len(mismatched)} of another shape; "
            f"file keys start {sorted(state)[:3]}, network keys {sorted(own)[:3]})",
            "check model.name and model.channels against the network that wrote the file",
        )
    net.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in fits.items()}})
    report = PretrainedReport(name, len(fits), len(own), missing[:20], unexpected[:20], mismatched[:20],
                              len(missing), len(unexpected), len(mismatched), removed)
    log.info("pretrained %s: %d of %d tensors loaded (%d missing, %d unexpected, %d of another shape%s)", name,
             len(fits), len(own), len(missing), len(unexpected), len(mismatched),
             f"; prefix {removed!r} removed" if removed else "")
    return report
