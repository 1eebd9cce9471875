"""Shared synthetic fixtures: a tiny MSD dataset and a model trained on it for a few steps (smoke preset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.config import load_config
from medseg.io.volume import Volume


def pytest_configure(config: pytest.Config) -> None:
    """The test run takes its CPU share like any medseg process (a demo or training beside it gets the rest)."""
    import os

    from medseg import threads

    threads.claim(threads.parse_threads(os.environ.get("MEDSEG_THREADS", "auto")))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-case synthetic CT dataset (3 training, 1 test) in MSD layout."""
    from medseg.sample_data import write_sample_data

    root = tmp_path_factory.mktemp("data")
    return write_sample_data(root, cases=4, seed=0, kinds=("ct3d",))["ct3d"]


@pytest.fixture(scope="session")
def smoke_model(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder trained with the smoke preset (seconds, untracked)."""
    from medseg.training.trainer import fit

    cfg = load_config("smoke", [f"data.dataset={tiny_dataset}"])
    return fit(cfg, tmp_path_factory.mktemp("run"), show_progress=False).model_dir


def oblique_affine(spacing: tuple[float, float, float], angle_deg: float, flips: tuple[int, int, int]) -> np.ndarray:
    """A voxel-to-world affine with flips, an in-plane rotation and an off-centre origin."""
    a = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(flips) @ np.diag(spacing)
    affine[:3, 3] = [12.5, -30.25, 101.0]
    return affine


@pytest.fixture
def make_volume():
    """Builds a random int16 volume ``(1, X, Y, Z)`` on a given affine."""

    def _make(shape=(20, 18, 9), affine=None, seed=0) -> Volume:
        rng = np.random.default_rng(seed)
        arr = rng.integers(-1000, 1000, size=(1, *shape)).astype(np.int16)
        return Volume(arr, np.eye(4) if affine is None else affine)

    return _make


@pytest.fixture(scope="session")
def tiny_dataset_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-case synthetic dermoscopy dataset (3 training, 1 test), PNG."""
    from medseg.sample_data import write_sample_data

    return write_sample_data(tmp_path_factory.mktemp("data2d"), cases=4, seed=0, kinds=("derm2d",))["derm2d"]


@pytest.fixture(scope="session")
def smoke_model_2d(tiny_dataset_2d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2D model folder trained for a few steps on RGB photos."""
    from medseg.training.trainer import fit

    cfg = load_config(
        "smoke",
        [f"data.dataset={tiny_dataset_2d}", "data.spacing=[2.0, 2.0]", "data.patch_size=[32, 32]",
         "data.intensity.scheme=rgb", "data.clahe.enabled=true"],
    )
    return fit(cfg, tmp_path_factory.mktemp("run2d"), show_progress=False).model_dir


@pytest.fixture
def fixed_threads(monkeypatch: pytest.MonkeyPatch):
    """One torch thread count for every run of a test that compares runs bit for bit: CPU reductions split work by
    thread, and the share medseg takes between epochs (``threads.refresh``) follows the machine's load, which other
    tests and programs change."""
    import torch

    from medseg import threads

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "refresh", lambda: None)
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
