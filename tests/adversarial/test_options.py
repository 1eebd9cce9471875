"""Class 9: every option error is one line ``error: CODE: ...`` with exit 2, in the same format as every other
error (not Click's boxed usage text): out-of-range and non-finite numbers, unknown options and commands, missing
required options, malformed values."""

from __future__ import annotations

from pathlib import Path

import pytest
from adversarial_helpers import assert_coded, run_process

BAD = [
    (["predict", "-i", "x", "-o", "y", "-m", "z", "--overlap", "1.5"], "OPTION_INVALID", "--overlap"),
    (["predict", "-i", "x", "-o", "y", "-m", "z", "--overlap", "nan"], "OPTION_INVALID", "--overlap"),
    (["predict", "-i", "x", "-o", "y", "-m", "z", "--overlap", "0.999"], "OPTION_INVALID", "--overlap"),
    (["predict", "-i", "x", "-o", "y", "-m", "z", "--overlap", "half"], "OPTION_INVALID", "--overlap"),
    (["predict", "-i", "x", "-m", "z"], "OPTION_INVALID", "--out"),
    (["predict", "--no-such-flag"], "OPTION_INVALID", "--no-such-flag"),
    (["sample-data", "-o", "x", "-n", "1"], "OPTION_INVALID", "--cases"),
    (["serve", "-m", "m", "-o", "o", "--port", "70000"], "OPTION_INVALID", "--port"),
    (["evaluate", "-p", "a", "-r", "b", "-o", "c", "--window", "0"], "OPTION_INVALID", "--window"),
    (["no-such-command"], "OPTION_INVALID", "no-such-command"),
    (["predict", "-i", ".", "-o", "y", "-m", "z", "--shard", "3/2"], "SHARD_INVALID", "3/2"),
    (["train", "-c", "smoke", "--threads", "many"], "THREADS_INVALID", "many"),
]


@pytest.mark.parametrize("args, code, named", BAD, ids=[" ".join(b[0][-2:]) for b in BAD])
def test_option_errors_are_coded_one_liners(args, code, named, cli, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = cli(*args)
    assert_coded(run, code)
    assert named in run.err and "╭" not in run.err and "Usage:" not in run.err


def test_option_errors_from_the_installed_command(tmp_path: Path):
    """The console script itself (a subprocess: what a user's shell runs)."""
    run = run_process("predict", "-i", "x", "-o", "y", "-m", "z", "--overlap", "1.5", cwd=tmp_path)
    assert_coded(run, "OPTION_INVALID")
    assert len(run.lines) == 1
