"""Cached loading: the deterministic preprocessing of each case is computed once and reused.

The cache key is a hash of the case's files (path, size, modification time) and of the preprocessing spec
(plan hash, spacing, intensity and CLAHE settings, medseg version): changing any of them recomputes the case.
The disk cache holds one uncompressed ``.npz`` per case (image float32, label uint8/uint16, affine), written
atomically and read without pickle. Later epochs therefore only run the random augmentation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch.utils.data import Dataset

from medseg.fsutil import atomic_write, json_hash
from medseg.transforms.pipeline import IMAGE, LABEL


def _file_key(path: str | list[str]) -> list:
    """Identity of an input for the cache: path, size and mtime (of each channel file; of each file in a
    DICOM folder)."""
    if isinstance(path, (list, tuple)):
        return [_file_key(p) for p in path]
    p = Path(path)
    if p.is_dir():
        return [str(p.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(p.rglob("*")) if f.is_file()]
    stat = p.stat()
    return [str(p.resolve()), stat.st_size, stat.st_mtime_ns]


class PreprocessedCache:
    """Computes (``preprocess``) or fetches the preprocessed form of a case.

    Args:
        preprocess: The deterministic transform (reads files, resamples, normalises).
        mode: ``disk``, ``memory`` or ``none``.
        cache_dir: Folder of the disk cache.
        spec: :func:`medseg.transforms.pipeline.preprocessing_hash` of the run.
    """

    def __init__(self, preprocess: Callable[[dict], dict], mode: str, cache_dir: Path | None, spec: str) -> None:
        self.preprocess, self.mode, self.cache_dir, self.spec = preprocess, mode, cache_dir, spec
        self._memory: dict[str, dict] = {}
        self.computed = 0  # cases preprocessed from the raw files (cache misses)
        self.loaded = 0  # cases read back from the disk cache

    def key(self, item: dict) -> str:
        parts = {"case": item["case_id"], IMAGE: _file_key(item[IMAGE]), LABEL: _file_key(item[LABEL]), "spec": self.spec}
        return json_hash(parts, length=24)

    def get(self, item: dict) -> dict:
        """The preprocessed case: ``{image, label}`` MetaTensors and ``case_id``."""
        if self.mode == "none":
            self.computed += 1
            return self.preprocess(item)
        key = self.key(item)
        if key in self._memory:
            return dict(self._memory[key])
        path = self.cache_dir / f"{key}.npz" if self.cache_dir else None
        if self.mode == "disk" and path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as z:
                affine = torch.from_numpy(z["affine"])
                out = {
                    IMAGE: MetaTensor(torch.from_numpy(z["image"]), affine=affine),
                    LABEL: MetaTensor(torch.from_numpy(z["label"].astype(np.float32)), affine=affine.clone()),
                    "case_id": item["case_id"],
                }
            self.loaded += 1
        else:
            out = self.preprocess(item)
            out = {IMAGE: out[IMAGE], LABEL: out[LABEL], "case_id": item["case_id"]}
            self.computed += 1
            if self.mode == "disk" and path is not None:
                self._write(path, out)
        if self.mode == "memory":
            self._memory[key] = out
        return dict(out)

    @staticmethod
    def _write(path: Path, case: dict) -> None:
        label = case[LABEL].as_tensor().numpy()
        label = label.astype(np.uint8 if label.max() < 256 else np.uint16)
        arrays = {
            "image": case[IMAGE].as_tensor().numpy().astype(np.float32),
            "label": label,
            "affine": case[IMAGE].affine.numpy().astype(np.float64),
        }

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)

        atomic_write(path, write)


class CaseDataset(Dataset):
    """Cases through a :class:`PreprocessedCache`, then the random ``transform`` (None for validation)."""

    def __init__(self, items: list[dict], cache: PreprocessedCache, transform: Callable | None = None) -> None:
        self.items, self.cache, self.transform = items, cache, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        case = self.cache.get(self.items[index])
        return self.transform(case) if self.transform is not None else case
