"""Class 10: on a machine shared with programs that are not medseg's, ``--threads auto`` counts the CPUs they keep
busy (OpenMP threads spin while waiting for a descheduled sibling, so two threads on a shared core lose far more
than fair share). The slowdown itself is measured by ``benchmarks/threads.py`` (part c), not timed here."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from medseg import threads
from medseg.threads import CpuShare, _Entry, share_for

pytestmark = pytest.mark.skipif(threads.cpu_budget() < 2, reason="needs two CPUs to share one")


class _Busy:
    """A busy-looping process that is not this one's descendant (started by a shell that exits at once), as a
    foreign program on a shared machine is."""

    def __init__(self) -> None:
        done = subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                              capture_output=True, text=True, check=True)
        self.pid = int(done.stdout.strip())

    def kill(self) -> None:
        try:
            psutil.Process(self.pid).kill()
            psutil.Process(self.pid).wait(10)
        except psutil.Error:
            pass

    def wait(self) -> None:
        pass


def _busy() -> _Busy:
    return _Busy()


def _until(share: CpuShare, expected: int, seconds: float = 8.0) -> int:
    """The share, read every 0.6 s until it is ``expected`` (a reading covers the time since the last one)."""
    deadline = time.monotonic() + seconds
    value = share.current()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.6)
        value = share.current()
    return value


def test_the_rule_takes_foreign_cpus_out_first():
    me = _Entry(1, 0.0, 0)
    assert share_for([me], me, 2, foreign=1) == 1
    assert share_for([me, _Entry(2, 0.0, 0)], me, 8, foreign=2) == 3
    assert share_for([me], me, 2, foreign=5) == 1  # never below one thread
    assert share_for([_Entry(1, 0.0, 3)], _Entry(1, 0.0, 3), 2, foreign=1) == 3  # --threads N is N


def test_a_foreign_busy_process_takes_a_cpu_from_the_share(tmp_path: Path):
    from medseg.threads import LoadMeter

    assert LoadMeter().used_seconds() is not None
    budget = threads.cpu_budget()
    busy = _busy()
    try:
        time.sleep(0.3)
        share = CpuShare(None, folder=tmp_path, budget=budget)
        assert _until(share, budget - 1) == budget - 1 and share.foreign >= 1
    finally:
        busy.kill()
        busy.wait()
    assert _until(share, budget) == budget  # the load ended: the CPU comes back


def test_busy_medseg_processes_are_not_counted_as_foreign(tmp_path: Path):
    """Another registered medseg process's load is shared by the split rule, not subtracted a second time."""
    busy = _busy()
    try:
        (tmp_path / str(busy.pid)).write_text(f"{busy.pid} {psutil.Process(busy.pid).create_time()} 0\n")
        time.sleep(0.3)
        share = CpuShare(None, folder=tmp_path, budget=2)
        assert _until(share, 1) == 1
        time.sleep(0.6)
        share.current()
        assert share.foreign == 0
    finally:
        busy.kill()
        busy.wait()
