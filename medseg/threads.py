"""CPU threads per process: each medseg process takes its share of the machine's CPUs, not one thread per core.

PyTorch, OpenMP and BLAS each start one thread per core by default. Two medseg processes on a 2-core machine
(two ``--shard`` workers, a test run beside a demo) then run four busy threads on two cores; OpenMP's barriers
make every parallel region wait for its slowest, descheduled thread, so the loss is far worse than fair sharing.

The rule (``auto``, the default of every command's ``--threads``):

* the CPUs this process may use: its CPU affinity, capped by a cgroup CPU quota (containers, CI runners);
* the medseg processes running on this machine register in a per-user folder (a file per process, holding its
  pid, start time and fixed thread count). A process with ``--threads N`` takes N; the CPUs left are split
  evenly between the ``auto`` processes, at least one thread each. A registered process that started this one
  (a test run or a script calling ``medseg``) is taken to be waiting for it and is not counted;
* CPUs kept busy by processes that are not medseg's (another job, a BLAS-heavy script, a test run) are taken out
  of the budget first (:class:`LoadMeter`: CPU time used in this process's scope -- its cgroup, or the CPUs of its
  affinity -- minus the CPU time of the registered medseg processes and their children, over the last interval;
  each foreign CPU busy at least half the time counts). OpenMP's threads spin while they wait for each other, so
  two threads on a core shared with a foreign busy thread lose far more than that thread's share (measured on 2
  cores: a demo epoch 3.4x slower beside one busy thread, 7.4x beside a 2-thread BLAS process; with the foreign
  load counted, 1.3x and 2.1x: ``benchmarks/threads.py``, part c);
* the share is applied to torch (intra-op threads), every loaded OpenMP/BLAS pool (threadpoolctl) and the
  ``OMP_NUM_THREADS``-style variables that child processes inherit, and looked at again between epochs and
  between cases (:func:`refresh`), so a process that started alone gives CPUs back when another one starts, and
  takes them again when a foreign load ends.

Worker processes a medseg process starts itself (evaluation workers, data-loader workers) are part of its share:
they run one thread each (:func:`limit_worker`) and do not register.
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Variables read by OpenMP, OpenBLAS, MKL, BLIS, numexpr and Accelerate when a (child) process starts.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us``) quota, or None when unlimited."""
    try:
        limit, every = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(every)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def cpu_budget() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return max(1, cpus)


def registry_dir() -> Path:
    """The per-user folder where running medseg processes register (``$TMPDIR/medseg-cpu-<uid>``)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"medseg-cpu-{uid}"


@dataclass(frozen=True)
class _Entry:
    pid: int
    started: float
    fixed: int  # threads given with --threads; 0 = auto


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _ancestors() -> frozenset[int]:
    """Pids of the processes that started this one (they wait for it rather than compete with it)."""
    import psutil

    try:
        return frozenset(p.pid for p in psutil.Process().parents())
    except psutil.Error:  # pragma: no cover
        return frozenset()


def _live_entries(folder: Path) -> list[_Entry]:
    """Registered processes that still run (same pid *and* start time); stale files are removed."""
    entries: list[_Entry] = []
    try:
        files = list(folder.iterdir())
    except OSError:
        return entries
    for path in files:
        try:
            pid, started, fixed = path.read_text().split()
            entry = _Entry(int(pid), float(started), int(fixed))
        except (OSError, ValueError):
            continue  # being written, or not ours
        alive = _start_time(entry.pid)
        if alive is not None and abs(alive - entry.started) < 1.0:
            entries.append(entry)
        else:
            path.unlink(missing_ok=True)
    return entries


def share_for(entries: list[_Entry], me: _Entry, budget: int, foreign: int = 0) -> int:
    """Threads for ``me`` among the registered ``entries`` (``me`` included) on ``budget`` CPUs, of which
    ``foreign`` are kept busy by processes that are not medseg's."""
    if me.fixed:
        return me.fixed
    others_fixed = sum(e.fixed for e in entries if e.fixed and e.pid != me.pid)
    auto = max(1, sum(1 for e in entries if not e.fixed) + (0 if any(e.pid == me.pid for e in entries) else 1))
    return max(1, (budget - foreign - others_fixed) // auto)


def _cgroup_usage_file() -> tuple[Path, float] | None:
    """This process's cgroup CPU-usage counter and its unit in seconds (v2 ``cpu.stat`` usage_usec, v1
    ``cpuacct.usage`` in ns), or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.strip().lstrip("/")
        if hierarchy == "0" and controllers == "":
            candidates = [(Path("/sys/fs/cgroup") / rel / "cpu.stat", 1e-6), (Path("/sys/fs/cgroup/cpu.stat"), 1e-6)]
        elif "cpuacct" in controllers.split(","):
            candidates = [(Path("/sys/fs/cgroup") / d / rel / "cpuacct.usage", 1e-9) for d in ("cpuacct", "cpu,cpuacct")]
        else:
            continue
        for candidate, unit in candidates:
            if candidate.is_file():
                return candidate, unit
    return None


class LoadMeter:
    """CPU time used in this process's scope, to tell how many CPUs other programs keep busy.

    The scope is the CPUs of this process's affinity when it is pinned to fewer than the machine has (``/proc/stat``
    per CPU), else its cgroup (a container's own counter), else the whole machine (``/proc/stat``).
    """

    def __init__(self) -> None:
        try:
            self.cpus = sorted(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - macOS, Windows
            self.cpus = list(range(os.cpu_count() or 1))
        pinned = len(self.cpus) < (os.cpu_count() or len(self.cpus))
        self.cgroup = None if pinned else _cgroup_usage_file()
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def used_seconds(self) -> float | None:
        """CPU seconds used in the scope so far (None when it cannot be read)."""
        try:
            if self.cgroup is not None:
                path, unit = self.cgroup
                text = path.read_text()
                if path.name == "cpu.stat":
                    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("usage_usec"))) * unit
                return float(text.strip()) * unit
            wanted = {f"cpu{i}" for i in self.cpus}
            total = 0
            for line in Path("/proc/stat").read_text().splitlines():
                fields = line.split()
                if fields and fields[0] in wanted:  # user nice system idle iowait irq softirq steal
                    values = [int(v) for v in fields[1:9]]
                    total += values[0] + values[1] + values[2] + values[5] + values[6] + values[7]
            return total / self.tick
        except (OSError, ValueError, StopIteration, IndexError):
            return None


def _medseg_cpu_seconds(pids: set[int]) -> float:
    """CPU seconds of the given processes and of all their descendants (data-loader and evaluation workers)."""
    import psutil

    total, seen = 0.0, set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            family = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
        for member in family:
            if member.pid in seen:
                continue
            seen.add(member.pid)
            try:
                times = member.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                continue
    return total


def set_threads(n: int) -> None:
    """Sets torch's intra-op threads, every loaded OpenMP/BLAS pool and the variables children inherit to ``n``."""
    import torch
    from threadpoolctl import threadpool_limits

    for name in THREAD_VARIABLES:
        os.environ[name] = str(n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    threadpool_limits(limits=n)


def limit_worker(_: object = None) -> None:
    """Initialiser for worker processes (evaluation pool, DataLoader ``worker_init_fn``): one thread each."""
    from threadpoolctl import threadpool_limits

    for name in THREAD_VARIABLES:
        os.environ[name] = "1"
    threadpool_limits(limits=1)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


class CpuShare:
    """This process's registration and its current thread count (one per process: :func:`claim`)."""

    def __init__(self, fixed: int | None, folder: Path | None = None, budget: int | None = None) -> None:
        self.folder = folder or registry_dir()
        self.budget = budget or cpu_budget()
        started = _start_time(os.getpid()) or 0.0
        self.me = _Entry(os.getpid(), started, fixed or 0)
        self.path = self.folder / str(os.getpid())
        self.ancestors = _ancestors()
        self.threads = 0
        self.meter = LoadMeter()
        self.foreign = 0
        self._sample: tuple[float, float, float] | None = None  # (wall, scope seconds, medseg seconds)
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(f"{self.me.pid} {self.me.started} {self.me.fixed}\n")
            os.replace(tmp, self.path)
        except OSError as exc:  # read-only temp: still limit threads by the budget alone
            log.debug("cannot register in %s: %s", self.folder, exc)
        atexit.register(self.release)

    def current(self) -> int:
        """The share now, from the live registrations and the foreign load."""
        live = _live_entries(self.folder)
        entries = [e for e in live if e.pid not in self.ancestors]
        if not self.me.fixed:
            self.foreign = self.foreign_cpus({e.pid for e in live} | {self.me.pid})
        return share_for(entries, self.me, self.budget, self.foreign)

    def foreign_cpus(self, medseg_pids: set[int], min_interval: float = 0.5) -> int:
        """CPUs kept busy (at least half the time) by processes other than medseg's, over the time since the last
        reading (a first reading samples ``0.1 s``; readings closer than ``min_interval`` keep the last answer)."""
        import time

        def sample() -> tuple[float, float, float] | None:
            used = self.meter.used_seconds()
            return None if used is None else (time.monotonic(), used, _medseg_cpu_seconds(medseg_pids))

        if self._sample is None:
            self._sample = sample()
            if self._sample is None:
                return 0
            time.sleep(0.1)
        elif time.monotonic() - self._sample[0] < min_interval:
            return self.foreign
        now = sample()
        if now is None or self._sample is None:
            return 0
        wall, scope, mine = (a - b for a, b in zip(now, self._sample))
        self._sample = now
        if wall <= 0:
            return self.foreign
        busy = max(0.0, (scope - mine) / wall)
        return min(self.budget - 1, int(busy + 0.5))

    def refresh(self) -> int:
        """Applies the current share when it changed; returns it."""
        threads = self.current()
        if threads != self.threads:
            if self.threads:
                log.debug("CPU share: %d -> %d thread(s) (%d CPU(s) busy with other programs)", self.threads, threads,
                          self.foreign)
            set_threads(threads)
            self.threads = threads
        return threads

    def release(self) -> None:
        """Unregisters (at exit)."""
        try:
            if self.path.read_text().split()[:1] == [str(os.getpid())]:
                self.path.unlink(missing_ok=True)
        except OSError:
            pass


_SHARE: CpuShare | None = None


def claim(threads: int | None = None) -> int:
    """Registers this process (once) and applies its share; ``threads`` fixes the count (``--threads N``).

    Returns:
        The thread count applied.
    """
    global _SHARE
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise _invalid(threads)
    if _SHARE is None or (_SHARE.me.fixed or None) != threads:
        if _SHARE is not None:
            _SHARE.release()
        _SHARE = CpuShare(threads)
    return _SHARE.refresh()


def current() -> int | None:
    """The thread count applied by :func:`claim`, or None when this process has not claimed a share."""
    return _SHARE.threads if _SHARE is not None else None


def workers(requested: int, tasks: int) -> int:
    """Worker processes for ``tasks`` jobs: ``requested``, or (0) one per thread of this process's share."""
    share = current() or cpu_budget()
    return max(1, min(requested or share, tasks))


def io_threads(requested: int | None = None) -> int:
    """Threads for reading files (DICOM headers and pixel data): ``requested``, else this process's share
    (:func:`claim`; the CPU budget when none was claimed), at least 1. Decoding compressed pixel data is CPU work,
    so a reader beside other programs takes no more than the share ``--threads auto`` gives the network."""
    return max(1, requested or current() or cpu_budget())


def refresh() -> int | None:
    """Re-applies the share of a process that called :func:`claim` (between epochs, between cases); else None."""
    return _SHARE.refresh() if _SHARE is not None else None


def parse_threads(value: str) -> int | None:
    """``--threads`` values: ``auto`` -> None, else a positive integer."""
    if value.strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise _invalid(value) from None
    if n < 1:
        raise _invalid(value)
    return n


def _invalid(value: object):
    from medseg.errors import ConfigError

    return ConfigError("THREADS_INVALID", f"threads must be a positive integer or 'auto', got {value!r}",
                       "e.g. --threads 2, or leave it to share the CPUs (auto)")
