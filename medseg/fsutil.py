"""Crash-safe file writing and provenance helpers."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable


_UMASK = os.umask(0)
os.umask(_UMASK)  # read once at import: files get the usual permissions, not mkstemp's 0600


def atomic_write(path: Path, write: Callable[[Path], Any], suffix: str = "") -> Path:
    """Calls ``write(tmp_path)``, fsyncs the file and renames it over ``path``.

    A crash or a full disk leaves either the old file or the new one, never a partial file.
    ``suffix`` ends the temporary name, for writers that pick the format from it (``".nii.gz"``, ``".nrrd"``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the packages that decide a result."""
    import monai
    import numpy
    import torch

    import medseg

    return {
        "medseg": medseg.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "monai": monai.__version__,
        "numpy": numpy.__version__,
    }


def git_commit() -> str | None:
    """The medseg source checkout's commit, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
