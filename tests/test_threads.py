"""CPU share per process (medseg.threads): the split rule, the registry of live processes, and what it sets."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch
from threadpoolctl import threadpool_info

from medseg import threads
from medseg.errors import ConfigError
from medseg.threads import CpuShare, _Entry, share_for


@pytest.fixture(autouse=True)
def no_foreign_load(monkeypatch):
    """These tests check the split between medseg processes: load from other programs on this machine (counted
    by :class:`medseg.threads.LoadMeter`, tested in tests/adversarial/test_busy_machine.py) is left out."""
    monkeypatch.setattr(threads.LoadMeter, "used_seconds", lambda self: None)


def _e(pid: int, fixed: int = 0) -> _Entry:
    return _Entry(pid, 0.0, fixed)


@pytest.mark.parametrize(
    ("others", "fixed", "budget", "expected"),
    [
        ([], 0, 2, 2),  # alone: every CPU
        ([0], 0, 2, 1),  # two auto processes on 2 CPUs: one thread each
        ([0, 0, 0], 0, 2, 1),  # more processes than CPUs: at least one thread
        ([0], 0, 16, 8),
        ([3], 0, 8, 5),  # a fixed --threads 3 elsewhere is taken first
        ([3, 0], 0, 8, 2),  # (8 - 3) // 2
        ([0, 0], 4, 2, 4),  # --threads N is N, whatever else runs
        ([8], 0, 4, 1),  # others fixed more than the machine has: still one
    ],
)
def test_share_rule(others, fixed, budget, expected):
    me = _e(1, fixed)
    entries = [me, *(_e(100 + i, f) for i, f in enumerate(others))]
    assert share_for(entries, me, budget) == expected
    # a process that has not registered yet (its file not written) counts itself
    assert share_for(entries[1:], me, budget) == expected


def _register(folder: Path, pid: int, started: float, fixed: int = 0) -> Path:
    path = folder / str(pid)
    path.write_text(f"{pid} {started} {fixed}\n")
    return path


def test_registry_counts_live_processes_and_drops_stale_ones(tmp_path: Path):
    share = CpuShare(None, folder=tmp_path, budget=4)
    assert share.current() == 4
    assert (tmp_path / str(os.getpid())).read_text().split() == [str(os.getpid()), str(share.me.started), "0"]

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _register(tmp_path, other.pid, psutil.Process(other.pid).create_time())
        assert share.current() == 2
        reused = _register(tmp_path, other.pid, psutil.Process(other.pid).create_time() - 1000)  # a reused pid
        assert share.current() == 4 and not reused.exists()
        _register(tmp_path, other.pid, psutil.Process(other.pid).create_time(), fixed=3)
        assert share.current() == 1  # 4 CPUs - 3 fixed
        (tmp_path / "junk").write_text("not an entry")
        assert share.current() == 1
    finally:
        other.kill()
        other.wait()
    assert share.current() == 4 and not live.exists()  # the process ended: its file goes

    share.release()
    assert not (tmp_path / str(os.getpid())).exists()


def test_the_process_that_started_us_is_not_counted(tmp_path: Path):
    parent = psutil.Process().parent()
    _register(tmp_path, parent.pid, parent.create_time())
    assert CpuShare(None, folder=tmp_path, budget=2).current() == 2


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", ""])
def test_bad_thread_values_are_a_config_error(value):
    with pytest.raises(ConfigError) as err:
        threads.parse_threads(value)
    assert err.value.code == "THREADS_INVALID"


def test_parse_threads():
    assert threads.parse_threads("auto") is None and threads.parse_threads(" AUTO ") is None
    assert threads.parse_threads("3") == 3


def test_claim_sets_torch_openmp_and_child_variables():
    before = threads.current()
    try:
        assert threads.claim(1) == 1
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["OPENBLAS_NUM_THREADS"] == "1"
        pools = threadpool_info()
        assert pools and all(p["num_threads"] == 1 for p in pools)
        assert threads.current() == 1
        with pytest.raises(ConfigError):
            threads.claim(0)
    finally:
        restored = threads.claim(None)
    # automatic again: the share follows the machine's load (it may differ from `before` when that load changed)
    assert before is None or (not threads._SHARE.me.fixed and restored == threads.current())


def _worker_threads(_: int) -> tuple[int, str]:
    return torch.get_num_threads(), os.environ["OMP_NUM_THREADS"]


def test_worker_processes_run_one_thread_each():
    with ProcessPoolExecutor(max_workers=2, initializer=threads.limit_worker) as pool:
        assert set(pool.map(_worker_threads, range(4))) == {(1, "1")}
    assert threads.workers(3, 2) == 2 and threads.workers(1, 10) == 1
    assert threads.workers(0, 100) == threads.current()


SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from medseg import threads
    threads.LoadMeter.used_seconds = lambda self: None  # only the medseg processes' split is tested here
    me, other = Path(sys.argv[1]), Path(sys.argv[2])
    first = threads.claim()
    me.write_text("ready")
    while not other.exists():
        time.sleep(0.05)
    time.sleep(0.5)  # both registered
    second = threads.refresh() or first
    print(first, second, torch.get_num_threads(), flush=True)
    (me.parent / (me.name + ".done")).write_text("1")
    while not (other.parent / (other.name + ".done")).exists():
        time.sleep(0.05)
    """
)


def test_two_processes_split_the_machine(tmp_path: Path):
    """Two real medseg processes on this machine, started one after the other: the first starts with every CPU and
    gives half back when the second registers (between epochs/cases it calls refresh)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # a private registry, so other test runs here do not count
    env.pop("MEDSEG_THREADS", None)
    script = tmp_path / "claim.py"
    script.write_text(SCRIPT)
    a = subprocess.Popen([sys.executable, str(script), str(tmp_path / "a"), str(tmp_path / "b")], env=env,
                         stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "a").exists() and time.time() < deadline:
        time.sleep(0.05)
    b = subprocess.Popen([sys.executable, str(script), str(tmp_path / "b"), str(tmp_path / "a")], env=env,
                         stdout=subprocess.PIPE, text=True)
    out_a, out_b = a.communicate(timeout=120)[0].split(), b.communicate(timeout=120)[0].split()
    assert a.returncode == 0 and b.returncode == 0
    budget = threads.cpu_budget()
    half = max(1, budget // 2)
    assert [int(v) for v in out_a] == [budget, half, half]
    assert [int(v) for v in out_b] == [half, half, half]
    assert not list((tmp_path / f"medseg-cpu-{os.getuid()}").glob("[0-9]*"))  # both unregistered at exit


@pytest.mark.parametrize("how", ["flag", "env"])
def test_cli_refuses_bad_threads(tmp_path: Path, how: str):
    args = [sys.executable, "-m", "medseg", "evaluate", "-p", str(tmp_path), "-r", str(tmp_path), "-o", str(tmp_path / "e")]
    env = {**os.environ, "MEDSEG_THREADS": "none" if how == "env" else "auto"}
    done = subprocess.run(args + (["--threads", "0"] if how == "flag" else []), env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "THREADS_INVALID" in done.stderr and "Traceback" not in done.stderr


def test_dicom_reading_threads_follow_the_cpu_share(monkeypatch, tmp_path):
    """Header scan and pixel decoding use this process's share (--threads), not a fixed pool of 4."""
    from concurrent.futures import ThreadPoolExecutor

    from dicom_helpers import series

    from medseg import threads
    from medseg.io import dicom, dicom_headers

    series(tmp_path / "s", shape=(8, 8, 5))
    pools: list[int] = []

    class Recording(ThreadPoolExecutor):
        def __init__(self, max_workers=None, **kw):
            pools.append(max_workers)
            super().__init__(max_workers=max_workers, **kw)

    monkeypatch.setattr(dicom, "ThreadPoolExecutor", Recording)
    monkeypatch.setattr(dicom_headers, "ThreadPoolExecutor", Recording)
    monkeypatch.setattr(threads, "current", lambda: 3)
    volume = dicom.read_dicom(tmp_path / "s")
    assert volume.spatial_shape == (8, 8, 5) and pools == [3, 3]  # scan, then pixels
    monkeypatch.setattr(threads, "current", lambda: None)
    monkeypatch.setattr(threads, "cpu_budget", lambda: 1)
    pools.clear()
    dicom.read_dicom(tmp_path / "s")
    assert pools == [1, 1]
    assert threads.io_threads(6) == 6
