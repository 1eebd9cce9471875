"""Sending one case's DICOM results on (STOW-RS for ``--push``, C-STORE for the listener): one function for both,
with the same record and the same retries (``pacs.send_retries`` more tries, waiting ``pacs.backoff_s`` doubled each
time; a refusal that a retry cannot change ends at once)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from medseg.errors import MedsegError, describe


def _wait(seconds: float) -> None:
    time.sleep(seconds)


class Retriable(Exception):
    """A send that may succeed when tried again (no connection, association rejected or aborted)."""


def deliver(files: list[Path], to: str, send: Callable[[list], None], retries: int, backoff_s: float,
            code: str) -> dict:
    """Reads ``files`` and calls ``send(datasets)`` until it returns (or ``retries`` more tries after a
    :class:`Retriable` failure); never raises for the peer's answer.

    Args:
        to: How the record names the destination (no credentials).
        send: Sends the datasets; raises :class:`Retriable`, or a :class:`MedsegError` that is final.
        code: The error code of a send that failed after every try (``DICOM_SEND_FAILED``, ...).

    Returns:
        The case's ``delivery`` record: ``{"to", "status": "ok"|"failed", "instances", "error_code", "error",
        "seconds"}``.
    """
    import pydicom

    start = time.perf_counter()
    record: dict = {"to": to, "status": "ok", "instances": len(files), "error_code": None, "error": None}
    try:
        datasets = [pydicom.dcmread(f) for f in files]
        for attempt in range(retries + 1):
            try:
                send(datasets)
                break
            except Retriable as exc:
                if attempt == retries:
                    raise MedsegError(code, f"sending to {to} failed after {retries + 1} tries: {describe(exc)}") from None
                _wait(backoff_s * 2**attempt)
    except MedsegError as exc:
        record.update(status="failed", error_code=exc.code, error=exc.one_line())
    except Exception as exc:  # noqa: BLE001 - recorded: the local outputs stay, the run goes on
        record.update(status="failed", error_code=code, error=f"{code}: {describe(exc)}")
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record
