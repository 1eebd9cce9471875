"""Errors with stable codes.

Every error a user can cause (bad path, bad config, bad input file) is a :class:`MedsegError` carrying a
stable ``code`` (for scripts and manifests), a message saying what was expected and what was found, and a
``hint`` saying how to fix it. The CLI prints them as one line and exits non-zero; it never shows a traceback
for them. Messages must never contain patient identifiers: name files by path or case ID only.
"""

from __future__ import annotations


class MedsegError(Exception):
    """Base class for all user-facing medseg errors.

    Args:
        code: Stable, upper-snake-case error code, e.g. ``"CONFIG_UNKNOWN_KEY"``.
        message: What was expected and what was found.
        hint: How to fix it (optional).
    """

    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint

    def __reduce__(self):  # keep code and hint when raised in a worker process
        return (self.__class__, (self.code, self.message, self.hint))

    def one_line(self) -> str:
        """Returns the error as a single line: ``CODE: message (hint: ...)``."""
        text = f"{self.code}: {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return " ".join(text.split())


class ConfigError(MedsegError):
    """Invalid, unreadable or inconsistent configuration."""


class InputError(MedsegError):
    """A missing, unreadable or invalid input file or folder."""


class DatasetError(MedsegError):
    """A dataset folder whose layout or contents are not what its description says."""


class ModelError(MedsegError):
    """A model folder that is missing, incomplete or incompatible."""


class OutputError(MedsegError):
    """An output that cannot be written safely (exists, or lies inside the input tree)."""


class TrainingError(MedsegError):
    """Training cannot continue (non-finite loss, out of memory, ...)."""


def require_exists(path: "str | object", what: str) -> None:
    """Raises :class:`InputError` ``PATH_NOT_FOUND`` when ``path`` does not exist.

    Args:
        path: A filesystem path.
        what: What the path was supposed to be, e.g. ``"dataset folder"``.

    Raises:
        InputError: With code ``PATH_NOT_FOUND``.
    """
    from pathlib import Path

    p = Path(str(path))
    if not p.exists():
        raise InputError("PATH_NOT_FOUND", f"{what} not found: {p}", "check the path and the current directory")
