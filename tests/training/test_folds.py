import json
import subprocess
import sys
from pathlib import Path

import pytest

from medseg.errors import ConfigError
from medseg.training.folds import load_or_make_splits, make_folds, parse_folds


def test_folds_partition_the_cases_and_are_seeded():
    ids = [f"c{i:02d}" for i in range(11)]
    folds = make_folds(ids, 5, seed=3)
    vals = [c for f in folds for c in f["val"]]
    assert sorted(vals) == ids and len(set(vals)) == 11
    assert all(set(f["train"]) | set(f["val"]) == set(ids) and not set(f["train"]) & set(f["val"]) for f in folds)
    assert {len(f["val"]) for f in folds} == {2, 3}
    assert make_folds(ids, 5, seed=3) == folds and make_folds(ids, 5, seed=4) != folds


def test_splits_are_saved_and_reused(tmp_path: Path):
    ids = [f"c{i}" for i in range(6)]
    first = load_or_make_splits(tmp_path / "splits.json", ids, 3, seed=0)
    assert load_or_make_splits(tmp_path / "splits.json", ids, 3, seed=99) == first  # reused, not re-drawn
    with pytest.raises(ConfigError) as info:
        load_or_make_splits(tmp_path / "splits.json", ids + ["new"], 3, seed=0)
    assert info.value.code == "SPLITS_MISMATCH"


@pytest.mark.parametrize("text,expected", [("3", [3]), ("0-4", [0, 1, 2, 3, 4]), ("0,2", [0, 2]), ("all", ["all"])])
def test_parse_folds(text, expected):
    assert parse_folds(text, 5) == expected


@pytest.mark.parametrize("bad", ["5", "x", "1-9"])
def test_parse_folds_rejects(bad):
    with pytest.raises(ConfigError):
        parse_folds(bad, 5)


def test_cross_validation_from_the_cli(tiny_dataset: Path, tmp_path: Path):
    out = tmp_path / "cv"
    cmd = [sys.executable, "-m", "medseg", "-q", "train", "-c", "smoke", "--set", f"data.dataset={tiny_dataset}",
           "--set", "data.folds=3", "--folds", "0-2", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits["folds"]) == 3
    for k in range(3):
        assert json.loads((out / f"fold_{k}" / "splits.json").read_text())["val"] == splits["folds"][k]["val"]
        assert (out / f"fold_{k}" / "validation" / "evaluation" / "report.html").is_file()
    summary = json.loads((out / "cv_summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2] and "organ" in summary["mean_over_folds"]
    assert summary["pooled"]["organ"]["dice"]["n"] + summary["pooled"]["organ"]["dice"]["n_undefined"] == 3
    assert (out / "cv" / "evaluation" / "report.html").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medseg-smoke").experiment_id])
    assert sorted(r.data.tags["medseg.fold"] for r in runs) == ["0", "1", "2"]
    ended = {r.info.run_id: (r.info.status, r.info.end_time) for r in runs}
    assert {status for status, _ in ended.values()} == {"FINISHED"}

    # --resume after every fold finished: the folds are reused, their MLflow runs stay as they ended
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "cv_summary.json").read_text())["folds"] == summary["folds"]
    runs = client.search_runs([client.get_experiment_by_name("medseg-smoke").experiment_id])
    assert {r.info.run_id: (r.info.status, r.info.end_time) for r in runs} == ended
