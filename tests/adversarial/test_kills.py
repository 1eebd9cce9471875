"""Class 6: kills leave no debris and lose nothing. A folder run killed with SIGKILL at random points (while writing
outputs, previews, probabilities or the manifest) and resumed ends with every case complete, every output
matching its recorded hash and no temporary file; SIGTERM stops a run like Ctrl-C, with a message, a manifest
and exit 143."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
from adversarial_helpers import assert_coded, medseg_process, partials, run_process

from medseg.fsutil import sha256_file


@pytest.fixture(scope="module")
def many_cases(case_folder: Path, tmp_path_factory) -> Path:
    """Eight small cases (the three training images under several names)."""
    folder = tmp_path_factory.mktemp("many") / "in"
    folder.mkdir()
    sources = sorted(case_folder.iterdir())
    for k in range(8):
        shutil.copy(sources[k % len(sources)], folder / f"case_{k:02d}.nii.gz")
    return folder


def _args(inputs: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["-q", "predict", "-i", str(inputs), "-o", str(out), "-m", str(model), "--no-tta", "--preview",
            "--save-probabilities", "--threads", "1", *extra]


def _wait_for(path: Path, proc, timeout: float = 120) -> None:
    start = time.monotonic()
    while not path.exists():
        if proc.poll() is not None or time.monotonic() - start > timeout:
            return
        time.sleep(0.02)


def _assert_complete(out: Path, n: int) -> None:
    from medseg.inference.outputs import verify_output

    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["status"] for c in manifest["cases"]] == ["ok"] * n, manifest["cases"]
    for case in manifest["cases"]:
        for record in case["outputs"].values():
            path = out / record["file"]
            assert sha256_file(path) == record["sha256"] and verify_output(path), path
    assert partials(out) == [] and not (out / ".medseg-reserve").exists()


def test_sigkill_at_random_points_then_resume(tmp_path: Path, many_cases: Path, smoke_model: Path):
    out = tmp_path / "out"
    rng = random.Random(24)
    kills = 0
    for round_ in range(3):
        proc = medseg_process(*_args(many_cases, out, smoke_model, *(["--resume"] if round_ else [])))
        _wait_for(out / "manifest.json", proc)  # the first case of this run is being written
        time.sleep(rng.uniform(0.0, 1.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate()
    final = run_process(*_args(many_cases, out, smoke_model, "--resume"))
    assert final.code == 0, final.err
    assert kills >= 1
    _assert_complete(out, 8)


def test_sigterm_stops_cleanly_with_a_message(tmp_path: Path, many_cases: Path, smoke_model: Path):
    out = tmp_path / "out"
    proc = medseg_process(*_args(many_cases, out, smoke_model))
    _wait_for(out / "manifest.json", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    from adversarial_helpers import Run

    assert_coded(Run(proc.returncode, stdout, stderr), "RUN_INTERRUPTED", exit_code=143)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {c["status"] for c in manifest["cases"]} <= {"ok", "pending"} and manifest["n_pending"] >= 1
    assert partials(out) == []
    resumed = run_process(*_args(many_cases, out, smoke_model, "--resume"))
    assert resumed.code == 0, resumed.err
    _assert_complete(out, 8)


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path: Path, cli, smoke_model: Path, case_folder: Path):
    out = tmp_path / "out"
    assert cli("predict", "-i", case_folder, "-o", out, "-m", smoke_model, "--no-tta").code == 0
    host = re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:24]
    dead = 2**22 + 12345  # above any pid this machine hands out
    debris = [out / f".ct_000.nii.gz.~{host}~{dead}~abc.partial.nii.gz", out / ".manifest.json.x1y2.partial",
              out / "previews" / f".ct_001.png.~{host}~{dead}~q.partial"]
    live = out / f".ct_002.nii.gz.~{host}~{os.getpid()}~zz.partial.nii.gz"  # a concurrent writer (this process)
    other_host = out / f".ct_002.nii.gz.~elsewhere~{dead}~zz.partial.nii.gz"
    for path in [*debris, live, other_host]:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"\0" * 100)
    assert cli("predict", "-i", case_folder, "-o", out, "-m", smoke_model, "--no-tta", "--resume").code == 0
    assert not any(p.exists() for p in debris) and live.exists() and other_host.exists()
