"""``medseg serve``: a real DICOM listener receiving series over C-STORE (pynetdicom as the sender), segmenting
them and sending the SEG on to a real Orthanc; refusals, aborts, malformed objects and shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orthanc
import pydicom
import pytest
from dicom_helpers import CANARY_ID, CANARY_NAME
from pacs_helpers import write_study
from pydicom.dataset import Dataset

from medseg.config import load_config
from medseg.inference.predictor import Predictor
from medseg.inference.runner import RunOptions
from medseg.pacs.listener import Listener, parse_dest

CT = "1.2.840.10008.5.1.4.1.1.2"


def send(port: int, datasets: list, calling: str = "TESTSCU", abort: bool = False) -> list[int | None]:
    """C-STOREs ``datasets`` to the listener; returns each status (None: no answer), [] when not associated."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context(CT)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEG")
    if not assoc.is_established:
        return []
    statuses = []
    for ds in datasets:
        status = assoc.send_c_store(ds)
        statuses.append(int(status.Status) if status else None)
    assoc.abort() if abort else assoc.release()
    return statuses


def malformed() -> Dataset:
    """A CT 'instance' without SeriesInstanceUID (and no pixels): not usable."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT, pydicom.uid.generate_uid()
    ds.PatientName = CANARY_NAME
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    return ds


def wait_for(condition, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def manifest(out: Path) -> dict:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def test_listener_segments_a_series_and_stores_the_seg_in_orthanc(orthanc_server, tiny_dataset, smoke_model,
                                                                   tmp_path: Path):
    study = write_study(tmp_path / "study", tiny_dataset)
    out, port = tmp_path / "out", orthanc.free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "medseg", "serve", "-m", str(smoke_model), "-o", str(out), "--port", str(port),
         "--dest", f"{orthanc_server.aet}@127.0.0.1:{orthanc_server.dicom_port}", "--pacs", "idle_s=1",
         "-t", "dicom-seg,rtstruct", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "MEDSEG_THREADS": "1"})
    try:
        wait_for(lambda: manifest(out).get("listener"), 120, "the listener to start")
        assert send(port, [malformed()]) == [0xC210]  # refused, recorded, the listener goes on
        partial = [pydicom.dcmread(f) for f in study.others[:1]] + [pydicom.dcmread(f) for f in study.ct[:2]]
        for ds in partial[1:]:
            ds.SeriesInstanceUID = "1.2.3.4.5.6.7"  # a second series, cut off by an abort
        assert send(port, partial[1:], abort=True)[:2] == [0x0000, 0x0000]
        sent = time.monotonic()
        assert set(send(port, [pydicom.dcmread(f) for f in study.ct])) == {0x0000}
        sent = time.monotonic()
        wait_for(lambda: orthanc_server.instances("SEG"), 120, "the SEG in Orthanc")
        latency = time.monotonic() - sent
        wait_for(lambda: manifest(out).get("listener", {}).get("counts", {}).get("series_done", 0) >= 2, 60,
                 "both series processed")
    finally:
        serve.send_signal(signal.SIGTERM)
        console = serve.communicate(timeout=120)[0]
    assert serve.returncode == 0, console
    record = manifest(out)
    counts = record["listener"]["counts"]
    assert counts["malformed"] == 1 and counts["aborted"] == 1, counts
    codes = [e["code"] for e in record["listener"]["events"]]
    assert "LISTENER_MALFORMED" in codes and "LISTENER_ABORTED" in codes
    ok = [c for c in record["cases"] if c["status"] == "ok"]
    assert len(ok) == 1 and ok[0]["delivery"]["status"] == "ok" and ok[0]["delivery"]["instances"] == 2, record["cases"]
    skipped = [c for c in record["cases"] if c["status"] == "skipped"]
    assert len(skipped) == 1 and skipped[0]["error_code"] == "SERIES_NOT_SELECTED"  # the aborted 2-slice series
    [seg] = orthanc_server.instances("SEG")
    assert seg["series"]["SeriesDescription"] == f"medseg {smoke_model.name} — research use"
    assert len(orthanc_server.instances("RTSTRUCT")) == 1
    assert not any((out / ".incoming").iterdir())  # processed series' files are removed
    text = (out / "manifest.json").read_text() + console
    assert CANARY_ID not in text and CANARY_NAME.split("^")[0] not in text
    assert latency < 60


@pytest.fixture
def predictor(smoke_model):
    return Predictor.from_model_dir(smoke_model, "cpu")


def listener(predictor, out: Path, **pacs) -> Listener:
    cfg = load_config(None, [f"pacs.{k}={v}" for k, v in pacs.items()])
    return Listener(predictor, out, cfg.pacs, cfg.inference.series_selection,
                    RunOptions(overwrite=True, output_type="dicom-seg", progress=False, qc=False), port=0)


def test_listener_bounds_queue_and_disk_rejects_unknown_callers_and_resumes_after_stop(predictor, tiny_dataset,
                                                                                      tmp_path: Path):
    study = write_study(tmp_path / "study", tiny_dataset)
    out = tmp_path / "out"
    first = listener(predictor, out, idle_s=600, max_queue=1, allowed_calling_aets="[GOOD]")
    first.start()
    try:
        assert set(send(first.port, [pydicom.dcmread(f) for f in study.ct], calling="GOOD")) == {0x0000}
        other = pydicom.dcmread(study.ct[0])
        other.SeriesInstanceUID = "1.2.3.4.5.6.8"
        assert send(first.port, [other], calling="GOOD") == [0xA700]  # a second series: queue full
        assert send(first.port, [other], calling="STRANGER") == []  # association rejected
    finally:
        first.request_stop()
        first.stop()
    record = manifest(out)
    codes = [e["code"] for e in record["listener"]["events"]]
    assert "LISTENER_QUEUE_FULL" in codes and "LISTENER_CALLER_REJECTED" in codes, codes
    [pending] = record["cases"]
    assert pending["status"] == "pending" and pending["error_code"] == "LISTENER_STOPPED"
    assert len(list((out / ".incoming").glob("*/*.dcm"))) == len(study.ct)  # kept for the next start

    probe = listener(predictor, out)
    probe._recover()  # a left-over series is keyed by its UID: more of its instances would join it
    assert list(probe._series) == [pydicom.dcmread(study.ct[0]).SeriesInstanceUID]
    second = listener(predictor, out, idle_s=0.2, max_incoming_mb=0.001)
    second.start()
    try:
        wait_for(lambda: second.counts["series_done"] >= 1, 120, "the recovered series")
        assert send(second.port, [pydicom.dcmread(study.ct[0])]) == [0xA700]  # over max_incoming_mb
    finally:
        second.request_stop()
        second.stop()
    record = manifest(out)
    ok = [c for c in record["cases"] if c["status"] == "ok"]
    assert len(ok) == 1 and (out / ok[0]["output"]).is_file()
    assert "LISTENER_DISK_FULL" in [e["code"] for e in record["listener"]["events"]]


def test_parse_dest():
    assert str(parse_dest("PACS@10.0.0.5:104")) == "PACS@10.0.0.5:104"
    for bad in ("PACS@host", "@host:104", "A_TITLE_LONGER_THAN_16@h:1", "PACS@h:70000"):
        with pytest.raises(Exception) as info:
            parse_dest(bad)
        assert getattr(info.value, "code", None) == "DEST_INVALID"


def test_stop_finishes_the_case_in_progress(predictor, tiny_dataset, tmp_path: Path):
    study = write_study(tmp_path / "study", tiny_dataset)
    out = tmp_path / "out"
    server = listener(predictor, out, idle_s=0.1)
    server.start()
    try:
        assert set(send(server.port, [pydicom.dcmread(f) for f in study.ct])) == {0x0000}
        wait_for(lambda: server._busy is not None, 30, "the series to be taken up", interval=0.002)
    finally:
        busy = server._busy is not None
        server.request_stop()  # what SIGTERM does
        server.stop()
    assert busy  # the stop came while the series was being segmented
    cases = manifest(out)["cases"]
    assert [c["status"] for c in cases] == ["ok"] and (out / cases[0]["output"]).is_file()
