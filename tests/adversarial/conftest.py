"""Fixtures of the adversarial suite (issue 24): the CLI run in this process, and a folder of small cases.
Helpers (coded-error assertions, subprocesses, read-only and full file systems) are in tests/adversarial_helpers.py.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import pytest
from adversarial_helpers import Run


@pytest.fixture
def cli(capsys, caplog) -> callable:
    """Runs ``medseg ARGS`` in this process through ``medseg.cli.main`` (exit code, stdout, stderr + log lines);
    the signal handlers ``main`` installs are put back afterwards."""
    from medseg import cli as cli_module

    def run(*args: str) -> Run:
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        argv = sys.argv
        sys.argv = ["medseg", *map(str, args)]
        capsys.readouterr()
        caplog.clear()
        code = 0
        try:
            with caplog.at_level(logging.INFO):
                cli_module.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
        finally:
            sys.argv = argv
            getattr(cli_module, "_SIGNALLED", []).clear()
            for s, h in handlers.items():
                signal.signal(s, h)
        captured = capsys.readouterr()
        logs = "\n".join(record.getMessage() for record in caplog.records)
        return Run(code, captured.out, captured.err + "\n" + logs)

    return run



@pytest.fixture(scope="session")
def case_folder(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small CT cases in a folder of their own (copied from the tiny dataset's training images)."""
    import shutil

    folder = tmp_path_factory.mktemp("cases") / "in"
    shutil.copytree(tiny_dataset / "imagesTr", folder)
    return folder
