"""Crash-safe file writing and provenance helpers."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medseg.errors import OutputError, from_os_error

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once at import: files get the usual permissions, not mkstemp's 0600
_HOST = re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:24] or "host"
#: Temporary files of :func:`atomic_write`: ``.<name>.~<host>~<pid>~<random>.partial<suffix>``, so that a later run
#: can tell a dead writer's debris (same host, process gone) from a live writer's file (another shard worker).
_PARTIAL = re.compile(r"^\..+\.~(?P<host>[A-Za-z0-9-]*)~(?P<pid>\d+)~[^.]*\.partial")
_LEGACY_PARTIAL = re.compile(r"^\..+\.partial")  # written before the owner was part of the name


def atomic_write(path: Path, write: Callable[[Path], Any], suffix: str = "") -> Path:
    """Calls ``write(tmp_path)``, fsyncs the file and renames it over ``path``.

    A crash or a full disk leaves either the old file or the new one, never a partial file (a killed process
    leaves its temporary file, which :func:`remove_stale_partials` removes at the next run).
    ``suffix`` ends the temporary name, for writers that pick the format from it (``".nii.gz"``, ``".nrrd"``).

    Raises:
        OutputError: ``DISK_FULL``, ``OUTPUT_NOT_WRITABLE`` or ``OUTPUT_IS_FILE`` when the file system refuses
            (:func:`medseg.errors.from_os_error`); a writer that fails otherwise while the disk is full is
            ``DISK_FULL`` too (libraries such as SimpleITK report it in their own words).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.~{_HOST}~{os.getpid()}~", suffix=f".partial{suffix}",
                                        dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise from_os_error(exc, path.name) from None
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as exc:
        raise from_os_error(exc, path.name) from None  # named as the output, not its temporary file
    except MemoryError:
        raise
    except Exception:
        if _disk_full(path.parent):
            raise OutputError("DISK_FULL", f"no space left writing {path.name}",
                              "free disk space, then rerun with --resume to keep what is complete") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _disk_full(folder: Path) -> bool:
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return False
    return usage.free < 64 * 1024


def remove_stale_partials(folder: Path, recursive: bool = True) -> int:
    """Removes temporary files that writers killed mid-write left (see :func:`atomic_write`): those of processes
    on this host that no longer run, and those from before the owner was recorded. Another live process's file (a
    concurrent shard worker) and other hosts' files stay. Returns the number removed."""
    import psutil

    removed = 0
    if not folder.is_dir():
        return 0
    for path in folder.rglob(".*.partial*") if recursive else folder.glob(".*.partial*"):
        owner = _PARTIAL.match(path.name)
        if owner is None and not _LEGACY_PARTIAL.match(path.name):
            continue
        if owner is not None and (owner["host"] != _HOST or psutil.pid_exists(int(owner["pid"]))):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
        except OSError:
            continue
    return removed


def check_output_dir(folder: Path, what: str = "output folder", create: bool = True) -> Path:
    """Makes sure ``folder`` is (or can become) a writable folder, by creating it and writing, syncing and removing
    a probe file: a read-only disk, a missing permission, a file in the way or a full disk is found before any
    work, not after it. With ``create=False`` nothing is created: the probe goes to the nearest existing folder
    on the way (for commands that must not leave a folder behind when they refuse their input).

    Raises:
        OutputError: ``OUTPUT_IS_FILE``, ``OUTPUT_NOT_WRITABLE`` or ``DISK_FULL``.
    """
    folder = Path(folder)
    for place in (folder, *folder.parents):
        if place.exists() and not place.is_dir():
            raise OutputError("OUTPUT_IS_FILE", f"the {what} {folder.name} is (or lies under) an existing file "
                              f"{place.name}", "give a folder (a new name, or an existing folder)")
        if place.exists():
            break
    target = folder if create else next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".probe.~{_HOST}~{os.getpid()}~", suffix=".partial", dir=target)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise from_os_error(exc, folder.name) from None
    return folder


def check_output_file(path: Path) -> Path:
    """:func:`check_output_dir` for the folder of an output file, and no folder in the file's place.

    Raises:
        OutputError: ``OUTPUT_IS_FILE``, ``OUTPUT_NOT_WRITABLE`` or ``DISK_FULL``.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError("OUTPUT_IS_FILE", f"the output file {path.name} is an existing folder", "give a file name")
    check_output_dir(path.parent, "folder of the output file")
    return path


class DiskReserve:
    """A few MiB held on the output disk so that the run's record can still be written when the disk fills: a
    failed record write frees the reserve and tries once more (:meth:`retry`)."""

    NAME = ".medseg-reserve"

    def __init__(self, folder: Path, size: int) -> None:
        self.path = Path(folder) / self.NAME
        try:
            with open(self.path, "wb") as handle:
                try:
                    os.posix_fallocate(handle.fileno(), 0, size)
                except (AttributeError, OSError):
                    handle.write(b"\0" * size)
        except OSError:  # no room even for the reserve: the record's own write will report DISK_FULL
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        """Frees the reserved space (at the end of a run, or for a last record write)."""
        self.path.unlink(missing_ok=True)

    def retry(self, write: Callable[[], Any]) -> Any:
        """``write()``; on ``DISK_FULL`` frees the reserve and calls it once more."""
        try:
            return write()
        except OutputError as exc:
            if exc.code != "DISK_FULL" or not self.path.exists():
                raise
            self.release()
            return write()


MAX_JSON_BYTES = 256 * 1024**2  # a JSON record larger than this is not one medseg wrote (nor a dataset.json)


def read_json(path: Path, code: str, what: str, hint: str | None = None, error: type | None = None) -> Any:
    """Parses a JSON file medseg or a user wrote (manifest, evaluation record, model.json, dataset.json).

    Raises:
        InputError (or ``error``): ``code`` (with ``what`` and the reason) when the file is unreadable, not UTF-8,
            too large, nested too deeply or not JSON; ``PATH_NOT_FOUND`` when it is missing.
    """
    import json

    from medseg.errors import InputError, describe, require_file

    error = error or InputError

    path = require_file(path, what)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise error(code, f"{what} {path.name} is {path.stat().st_size / 1e6:.0f} MB, not a file medseg reads", hint)
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(exc, RecursionError) else describe(exc, path)
        raise error(code, f"{what} {path.name} is not valid JSON: {reason}", hint) from None
    except OSError as exc:
        raise error(code, f"cannot read {what} {path.name}: {describe(exc, path)}", hint) from None


def json_hash(data: Any, length: int = 16, compact: bool = False) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``data`` as canonical JSON (sorted keys; ``compact``: no
    spaces after separators). The one way medseg names content by hash (plans, fingerprints, configs, caches).

    Examples:
        >>> json_hash({"b": 1, "a": [1, 2]}) == json_hash({"a": [1, 2], "b": 1})
        True
        >>> len(json_hash([1, 2, 3], length=8))
        8
    """
    import json

    separators = (",", ":") if compact else None
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=separators, default=str).encode()).hexdigest()[:length]


def write_text(path: Path, text: str) -> Path:
    """Writes ``text`` (UTF-8) through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any, **dumps: Any) -> Path:
    """Writes ``data`` as indented JSON (UTF-8, a final newline) through :func:`atomic_write`."""
    import json

    return write_text(path, json.dumps(data, indent=2, **dumps) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_tensors(path: Path, code: str, what: str, error: type | None = None) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain Python values only, never code. A file holding
    pickled objects (a whole ``nn.Module``, a custom class) is refused with advice on what to save instead; the
    advice of torch's own message (to load with ``weights_only=False``, which runs whatever the file holds) is
    never passed on.

    Raises:
        MedsegError (or ``error``, a subclass): ``code`` naming ``what`` and the file.
    """
    import pickle

    import torch

    from medseg.errors import MedsegError, describe

    error = error or MedsegError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise error(code, f"{what} {Path(path).name} holds pickled Python objects (e.g. a whole model), not only "
                          "tensors: medseg does not load those, because unpickling can run any code the file contains",
                          "save the weights alone where they were made: torch.save(model.state_dict(), PATH), or "
                          "safetensors") from None
    except Exception as exc:  # noqa: BLE001 - a truncated zip, not a torch file, ...: one error for the user
        text = describe(exc, path, limit=200)
        if "weights_only" in text:  # torch's advice to unpickle everything: never shown
            text = type(exc).__name__
        raise error(code, f"cannot read {what} {Path(path).name}: {text}") from None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the packages that decide a result, read from their installed metadata: nothing is imported
    (``medseg report`` shows them without loading torch). The CUDA version comes from torch where it is loaded.

    Examples:
        >>> sorted(versions())
        ['cuda', 'medseg', 'monai', 'numpy', 'python', 'torch']
    """
    import sys
    from importlib import metadata

    import medseg

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    torch = sys.modules.get("torch")
    return {
        "medseg": medseg.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__ if torch is not None else installed("torch"),
        "cuda": str(torch.version.cuda) if torch is not None else "not loaded",
        "monai": installed("monai"),
        "numpy": installed("numpy"),
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
