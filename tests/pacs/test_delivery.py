"""One delivery path for --push (STOW-RS) and the listener (C-STORE): retries, backoff and the record."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from dicom_helpers import series

from medseg.config import load_config
from medseg.errors import MedsegError
from medseg.pacs import delivery
from medseg.pacs.delivery import Retriable, deliver


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    series(tmp_path / "s", shape=(8, 8, 3))
    return sorted((tmp_path / "s").iterdir())


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    waited: list[float] = []
    monkeypatch.setattr(delivery, "_wait", waited.append)
    return waited


def test_a_retriable_failure_is_retried_with_doubling_backoff_until_it_succeeds(files, sleeps):
    calls = []

    def send(datasets):
        calls.append(len(datasets))
        if len(calls) < 3:
            raise Retriable("association rejected")

    record = deliver(files, "PACS@127.0.0.1:104", send, retries=4, backoff_s=0.5, code="DICOM_SEND_FAILED")
    assert record["status"] == "ok" and record["instances"] == 3 and record["error_code"] is None
    assert calls == [3, 3, 3] and sleeps == [0.5, 1.0]


def test_every_try_failing_gives_the_code_and_the_number_of_tries(files, sleeps):
    def send(datasets):
        raise Retriable("no association")

    record = deliver(files, "PACS@127.0.0.1:104", send, retries=2, backoff_s=1.0, code="DICOM_SEND_FAILED")
    assert record["status"] == "failed" and record["error_code"] == "DICOM_SEND_FAILED"
    assert "after 3 tries" in record["error"] and sleeps == [1.0, 2.0]


def test_a_final_refusal_is_not_retried(files, sleeps):
    calls = []

    def send(datasets):
        calls.append(1)
        raise MedsegError("DICOMWEB_PUSH_REJECTED", "the server refused the instances (HTTP 409)")

    record = deliver(files, "https://pacs", send, retries=5, backoff_s=1.0, code="DICOMWEB_PUSH_FAILED")
    assert calls == [1] and sleeps == [] and record["error_code"] == "DICOMWEB_PUSH_REJECTED"


def test_the_listener_sender_retries_an_unreachable_peer_as_configured(files, sleeps):
    from medseg.pacs.listener import Destination, send_files

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = load_config(None, ["pacs.send_retries=2", "pacs.backoff_s=0.25", "pacs.dimse_timeout_s=2"]).pacs
    record = send_files(files, Destination("NOBODY", "127.0.0.1", port), "MEDSEG", settings)
    assert record["status"] == "failed" and record["error_code"] == "DICOM_SEND_FAILED"
    assert sleeps == [0.25, 0.5] and record["seconds"] < 30
