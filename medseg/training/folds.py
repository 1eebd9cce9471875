"""Case splits: the seeded train/validation split of one run, and k-fold cross-validation splits saved to
``splits.json`` once and reused by every fold."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.errors import ConfigError
from medseg.fsutil import read_json, write_json
from medseg.io.dataset import Case


def split_cases(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Seeded train/validation split; at least one case on each side.

    Raises:
        ConfigError: ``DATASET_TOO_SMALL`` with fewer than two training cases.
    """
    if len(cases) < 2:
        raise ConfigError("DATASET_TOO_SMALL", f"need at least 2 training cases to hold one out, found {len(cases)}")
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(max(1, round(len(cases) * val_fraction)), len(cases) - 1)
    val = sorted((cases[i] for i in order[:n_val]), key=lambda c: c.id)
    train = sorted((cases[i] for i in order[n_val:]), key=lambda c: c.id)
    return train, val


def make_folds(case_ids: list[str], k: int, seed: int) -> list[dict[str, list[str]]]:
    """Splits case IDs into ``k`` folds (shuffled with ``seed``, sizes differ by at most one).

    Returns:
        ``[{"train": [...], "val": [...]}, ...]``; every case is validated in exactly one fold.

    Raises:
        ConfigError: ``DATASET_TOO_SMALL`` with fewer cases than folds.
    """
    if len(case_ids) < k:
        raise ConfigError("DATASET_TOO_SMALL", f"{len(case_ids)} training case(s) cannot make {k} folds", "lower data.folds")
    order = [case_ids[i] for i in np.random.default_rng(seed).permutation(len(case_ids))]
    folds = [sorted(order[i::k]) for i in range(k)]
    return [{"train": sorted(c for j, f in enumerate(folds) if j != i for c in f), "val": folds[i]} for i in range(k)]


def load_or_make_splits(path: Path, case_ids: list[str], k: int, seed: int) -> list[dict[str, list[str]]]:
    """Reuses ``path`` when it exists (and matches the cases and k); otherwise writes new splits there.

    Raises:
        ConfigError: ``SPLITS_MISMATCH`` when the saved splits name other cases or another k.
    """
    if path.is_file():
        saved = read_json(path, "SPLITS_MISMATCH", "split record")
        folds = saved["folds"]
        cases = sorted({c for f in folds for c in f["val"]})
        if len(folds) != k or cases != sorted(case_ids):
            raise ConfigError(
                "SPLITS_MISMATCH",
                f"{path} holds {len(folds)} folds over {len(cases)} cases; the dataset has {len(case_ids)} cases and data.folds is {k}",
                "use a new output folder or delete splits.json",
            )
        return folds
    folds = make_folds(case_ids, k, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"seed": seed, "k": k, "folds": folds})
    return folds


def parse_folds(text: str, k: int) -> list[int | str]:
    """``"3"`` -> [3]; ``"0-4"`` -> [0..4]; ``"0,2"`` -> [0, 2]; ``"all"`` -> ["all"] (train on every case).

    Raises:
        ConfigError: ``CONFIG_INVALID_VALUE`` for other text or folds outside ``0..k-1``.
    """
    text = text.strip().lower()
    if text == "all":
        return ["all"]
    try:
        out: list[int | str] = []
        for part in text.split(","):
            if "-" in part:
                low, high = (int(v) for v in part.split("-"))
                out += list(range(low, high + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ConfigError("CONFIG_INVALID_VALUE", f"folds {text!r} should look like 3, 0-4, 0,2 or all") from None
    bad = [f for f in out if not 0 <= int(f) < k]
    if bad:
        raise ConfigError("CONFIG_INVALID_VALUE", f"fold(s) {bad} outside 0..{k - 1} (data.folds is {k})")
    return out
