"""`medseg train` runs medseg validate's checks on every training case before it writes anything of the run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.config import load_config


def _copy(tiny_dataset: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    return root


def _train(root: Path, run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg", "train", "-c", "smoke", "--set", f"data.dataset={root}",
                           "-o", str(run)], capture_output=True, text=True, timeout=300)


def _rewrite_label(path: Path, edit) -> None:
    img = nib.load(path)
    data, affine = np.asarray(img.dataobj).copy(), img.affine.copy()
    data, affine = edit(data, affine)
    nib.save(nib.Nifti1Image(data, affine, img.header), path)


@pytest.mark.parametrize(
    ("case", "code", "edit"),
    [
        ("ct_001", "LABEL_VALUES_UNEXPECTED", lambda d, a: (np.where(d == 1, 7, d).astype(d.dtype), a)),
        ("ct_002", "IMAGE_LABEL_MISMATCH", lambda d, a: (d, a + np.outer(np.eye(4)[0], np.eye(4)[3]) * 15.0)),
    ],
    ids=["undeclared-label-value", "label-origin-shifted-15mm"],
)
def test_train_refuses_bad_training_cases_before_writing_the_run(tiny_dataset: Path, tmp_path: Path, case, code, edit):
    root = _copy(tiny_dataset, tmp_path)
    _rewrite_label(root / "labelsTr" / f"{case}.nii.gz", edit)
    run = tmp_path / "run"
    done = _train(root, run)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {code}:") and case in line and "Traceback" not in done.stderr
    assert not run.exists()  # no tracking store, run.json, splits or config of a run that never started


def test_the_checks_and_the_fingerprint_are_one_read(tiny_dataset: Path, tmp_path: Path, monkeypatch):
    from medseg.io import validate
    from medseg.io.dataset import load_dataset
    from medseg.plan.fingerprint import load_or_compute
    from medseg.workflow import check_inputs

    reads: list[str] = []
    plain = validate.read_volume
    monkeypatch.setattr(validate, "read_volume", lambda path, **kw: reads.append(Path(path).name) or plain(path, **kw))
    cfg = load_config("smoke", [f"data.dataset={tiny_dataset}"])
    check_inputs(cfg, tmp_path / "run")
    labels = sorted(p.name for p in (tiny_dataset / "labelsTr").glob("*.nii.gz"))
    assert sorted(reads) == labels  # each training label read once, checked and measured in that read
    load_or_compute(load_dataset(tiny_dataset), tmp_path / "run" / "fingerprint.json")  # what training calls
    assert sorted(reads) == labels  # ... and not read again


def test_a_label_coding_for_a_label_the_dataset_lacks_is_refused_before_the_run(tiny_dataset: Path, tmp_path: Path):
    from medseg.errors import ConfigError
    from medseg.workflow import check_inputs

    cfg = load_config("smoke", [f"data.dataset={tiny_dataset}", "labels={livr: {rt_type: ORGAN}}"])
    with pytest.raises(ConfigError) as err:
        check_inputs(cfg, tmp_path / "run")
    assert err.value.code == "CONFIG_INVALID_VALUE" and "livr" in str(err.value)
    assert not (tmp_path / "run").exists()
