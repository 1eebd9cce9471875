"""Helpers of the adversarial suite (tests/adversarial): bad inputs, faults and kills against medseg's promises.

The promise every test holds medseg to: exit 2 with a stable code (or a manifest row and exit 1 in a folder run),
no traceback, nothing half-written, nothing lost, no patient identifier, memory bounded. Helpers here run the CLI
in-process (``main()``, as the console script does) or as a subprocess (for signals and memory limits), build
file systems that are read-only or full (a real tmpfs where this machine may mount one), and name the canary
values planted in folder names.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: A PACS export folder named after the patient, and the values that must never reach an output.
PATIENT_FOLDER = "DOE^JANE_19010203"
CANARIES = ["doe^jane", "19010203", "jane_1901"]


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def assert_coded(run: Run, code: str, exit_code: int = 2) -> None:
    """One line ``error: CODE: ...`` on stderr, the exit code, and no traceback anywhere."""
    assert run.code == exit_code, (run.code, run.err[-2000:])
    errors = [line for line in run.lines if line.startswith("error:")]
    assert errors and errors[-1].startswith(f"error: {code}:"), run.err[-2000:]
    assert "Traceback" not in run.out + run.err


def medseg_process(*args: str, **kwargs) -> subprocess.Popen:
    """``python -m medseg ARGS`` as a child process (output piped)."""
    return subprocess.Popen([sys.executable, "-m", "medseg", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def run_process(*args: str, timeout: float = 300, **kwargs) -> Run:
    proc = medseg_process(*args, **kwargs)
    out, err = proc.communicate(timeout=timeout)
    return Run(proc.returncode, out, err)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``path`` (skips where this machine may not mount one)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:100]}); the injected-fault test covers it")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only_folder(path: Path) -> Iterator[Path]:
    """A folder this process cannot write into: permissions for an ordinary user, a read-only tmpfs for root
    (whom permissions do not stop)."""
    if os.geteuid() != 0:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    with tmpfs(path, "1m", readonly=True) as mounted:
        yield mounted


def enospc(path: str | os.PathLike) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def partials(folder: Path) -> list[Path]:
    """Temporary files of interrupted writers left anywhere below ``folder``."""
    return [p for p in folder.rglob("*") if ".partial" in p.name]


def fuzz_settings(examples: int, **kwargs):
    """Hypothesis settings of the suite's property tests: derandomized (CI runs the same examples every time), or
    ``MEDSEG_FUZZ_EXAMPLES=N`` random ones for a deeper hunt on a developer's machine."""
    from hypothesis import HealthCheck, settings

    hunt = os.environ.get("MEDSEG_FUZZ_EXAMPLES")
    return settings(max_examples=int(hunt) if hunt else examples, derandomize=not hunt, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], **kwargs)
