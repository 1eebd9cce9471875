"""DICOMweb failures, each with its code in the manifest and on the console, nothing half-stored: against the real
Orthanc where it can produce the failure (unknown study, 401, no matching series, missing slice, size cap) and
against small fake servers where it cannot (403 with the token check, a download that stalls, a refused push)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orthanc
import pytest
from pacs_helpers import write_study

from medseg.cli import optional_push_value
from medseg.config import load_config
from medseg.errors import MedsegError
from medseg.inference.predictor import Predictor
from medseg.inference.runner import RunOptions
from medseg.pacs.dicomweb import parse_endpoint, predict_study, read_token
from medseg.pacs.selection import SeriesInfo, orientation_of, verdict


@pytest.fixture(scope="module")
def predictor(smoke_model):
    return Predictor.from_model_dir(smoke_model, "cpu")


def settings(*overrides: str):
    cfg = load_config(None, ["pacs.retries=1", "pacs.backoff_s=0.05", "pacs.timeout_s=2", *overrides])
    return cfg.pacs, cfg.inference.series_selection


def run(predictor, url: str, out: Path, *overrides: str, push: str | None = None, token: str | None = None,
        output_type: str = "dicom-seg"):
    pacs, rules = settings(*overrides)
    return predict_study(predictor, url, out, RunOptions(output_type=output_type, progress=False, qc=False), pacs,
                         rules, token=token, push=push)


def code_of(call) -> str:
    with pytest.raises(MedsegError) as info:
        call()
    return info.value.code


class Fake:
    """A DICOMweb server stub on 127.0.0.1: ``routes`` maps a path prefix to a function ``handler -> None``."""

    def __init__(self, routes: dict):
        outer = self
        self.headers: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _route(self):
                outer.headers.append(dict(self.headers))
                for prefix, fn in routes.items():
                    if self.path.startswith(prefix):
                        return fn(self)
                self.send_response(404)
                self.end_headers()

            do_GET = do_POST = _route

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def close(self):
        self.server.shutdown()


def reply(status: int, body: bytes = b"", content_type: str = "application/dicom+json"):
    def fn(handler):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return fn


STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"


def ct_metadata(n: int = 4) -> bytes:
    item = {"00080060": {"vr": "CS", "Value": ["CT"]}, "0020000E": {"vr": "UI", "Value": [SERIES]},
            "00280010": {"vr": "US", "Value": [32]}, "00280011": {"vr": "US", "Value": [32]},
            "00200037": {"vr": "DS", "Value": [1, 0, 0, 0, 1, 0]}, "00280100": {"vr": "US", "Value": [16]}}
    return json.dumps([item] * n).encode()


# ------------------------------------------------------------------------------------------ real Orthanc


def test_unknown_study_and_no_matching_series(orthanc_server, predictor, tiny_dataset, tmp_path: Path):
    study = write_study(tmp_path / "study", tiny_dataset)
    orthanc_server.upload(study.ct + study.others)
    unknown = f"{orthanc_server.dicomweb}/studies/1.2.3.999"
    assert code_of(lambda: run(predictor, unknown, tmp_path / "a")) == "DICOMWEB_STUDY_NOT_FOUND"
    url = f"{orthanc_server.dicomweb}/studies/{study.uid}"
    assert code_of(lambda: run(predictor, url, tmp_path / "b", "inference.series_selection.modalities=[MR]")) \
        == "NO_SERIES_MATCHED"
    record = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert record["n_skipped"] == 3 and {c["error_code"] for c in record["cases"]} == {"SERIES_NOT_SELECTED"}
    assert all("not one of MR" in c["error"] for c in record["cases"])
    # a description rule and the orientation rule leave the CT out too
    assert code_of(lambda: run(predictor, url, tmp_path / "c", "inference.series_selection.description_regex=liver")) \
        == "NO_SERIES_MATCHED"
    assert code_of(lambda: run(predictor, url, tmp_path / "d", "inference.series_selection.orientation=sagittal")) \
        == "NO_SERIES_MATCHED"


def test_missing_slice_and_size_cap_are_failed_cases_and_nothing_is_left_behind(orthanc_server, predictor,
                                                                                tiny_dataset, tmp_path: Path):
    study = write_study(tmp_path / "study", tiny_dataset, missing_slice=True)
    orthanc_server.upload(study.ct)
    url = f"{orthanc_server.dicomweb}/studies/{study.uid}"
    [result] = run(predictor, url, tmp_path / "a")
    assert result.status == "failed" and result.error_code == "DICOM_SLICE_GAP"
    assert not (tmp_path / "a" / ".dicomweb-download").exists() and not list((tmp_path / "a").glob("*.dcm"))
    [result] = run(predictor, url, tmp_path / "b", "pacs.max_series_mb=0.01")
    assert result.status == "failed" and result.error_code == "SERIES_TOO_LARGE"
    [result] = run(predictor, url, tmp_path / "c", "pacs.max_study_mb=0.01")
    assert result.status == "failed" and result.error_code == "STUDY_TOO_LARGE"
    assert not list((tmp_path / "c").glob("*.dcm")) and not (tmp_path / "c" / ".dicomweb-download").exists()


def test_401_from_a_server_that_wants_credentials(tmp_path: Path, predictor):
    orthanc.require()
    server = orthanc.start(tmp_path / "orthanc", users={"alice": "secret"})
    try:
        url = f"{server.dicomweb}/studies/1.2.3"
        assert code_of(lambda: run(predictor, url, tmp_path / "a", token="not-a-valid-token")) == "DICOMWEB_UNAUTHORIZED"
    finally:
        server.stop()


def test_refused_push_is_recorded_and_local_results_stay(orthanc_server, predictor, tiny_dataset, tmp_path: Path):
    study = write_study(tmp_path / "study", tiny_dataset)
    orthanc_server.upload(study.ct)
    failed = {"00081198": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.66.4"]},
                                                  "00081197": {"vr": "US", "Value": [0xA700]}}]}}
    fake = Fake({"/dicom-web/studies": reply(409, json.dumps(failed).encode())})
    try:
        out = tmp_path / "out"
        [result] = run(predictor, f"{orthanc_server.dicomweb}/studies/{study.uid}", out, push=fake.url)
    finally:
        fake.close()
    assert result.status == "ok" and result.delivery["status"] == "failed"
    assert result.delivery["error_code"] == "DICOMWEB_PUSH_REJECTED"
    record = json.loads((out / "manifest.json").read_text())
    assert record["n_delivery_failed"] == 1 and record["cases"][0]["delivery"]["error_code"] == "DICOMWEB_PUSH_REJECTED"
    seg = out / record["cases"][0]["output"]
    from medseg.fsutil import sha256_file

    assert sha256_file(seg) == record["cases"][0]["sha256"]
    assert not orthanc_server.instances("SEG")  # nothing stored anywhere else


# ------------------------------------------------------------------------------------------ fake servers


def test_403_sends_the_bearer_token_from_env_or_file_and_never_records_it(predictor, tmp_path: Path, monkeypatch):
    fake = Fake({"/dicom-web/studies": reply(403)})
    try:
        url = f"{fake.url}/studies/{STUDY}"
        monkeypatch.setenv("MEDSEG_DICOMWEB_TOKEN", "tok-from-env-123")
        pacs, _ = settings()
        assert code_of(lambda: run(predictor, url, tmp_path / "a", token=read_token(pacs, None))) == "DICOMWEB_FORBIDDEN"
        assert fake.headers[-1]["Authorization"] == "Bearer tok-from-env-123"
        (tmp_path / "token").write_text("tok-from-file-456\n")
        assert code_of(lambda: run(predictor, url, tmp_path / "b", token=read_token(pacs, tmp_path / "token"))) \
            == "DICOMWEB_FORBIDDEN"
        assert fake.headers[-1]["Authorization"] == "Bearer tok-from-file-456"
    finally:
        fake.close()
    (tmp_path / "empty").write_text("\n")
    assert code_of(lambda: read_token(pacs, tmp_path / "empty")) == "DICOMWEB_TOKEN_INVALID"
    assert code_of(lambda: read_token(pacs, tmp_path / "missing")) == "DICOMWEB_TOKEN_INVALID"


def test_unreachable_server(predictor, tmp_path: Path):
    url = f"http://127.0.0.1:{orthanc.free_port()}/dicom-web/studies/{STUDY}"
    assert code_of(lambda: run(predictor, url, tmp_path / "a")) == "DICOMWEB_UNREACHABLE"


def test_download_that_stalls_is_retried_then_recorded_and_removed(predictor, tmp_path: Path):
    import time

    calls = []

    def stall(handler):
        calls.append(1)
        handler.send_response(200)
        handler.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=xyz')
        handler.end_headers()
        handler.wfile.write(b"--xyz\r\nContent-Type: application/dicom\r\n\r\nDICM")
        handler.wfile.flush()
        time.sleep(5)  # longer than pacs.timeout_s

    series = json.dumps([{"0020000E": {"vr": "UI", "Value": [SERIES]}}]).encode()
    fake = Fake({f"/dicom-web/studies/{STUDY}/series/{SERIES}/metadata": reply(200, ct_metadata()),
                 f"/dicom-web/studies/{STUDY}/series/{SERIES}": stall,
                 f"/dicom-web/studies/{STUDY}/series": reply(200, series)})
    try:
        out = tmp_path / "out"
        [result] = run(predictor, f"{fake.url}/studies/{STUDY}", out, "pacs.timeout_s=0.5")
    finally:
        fake.close()
    assert result.status == "failed" and result.error_code == "DICOMWEB_TIMEOUT"
    assert len(calls) == 2  # one retry (pacs.retries=1)
    assert not (out / ".dicomweb-download").exists()
    record = json.loads((out / "manifest.json").read_text())
    assert record["source"]["dicomweb"]["series"][0]["code"] == "DICOMWEB_TIMEOUT"


# ------------------------------------------------------------------------------------------ units


def test_parse_endpoint():
    e = parse_endpoint("https://pacs.example.org:8443/dicom-web/studies/1.2.3/series/4.5", need_study=True)
    assert (e.base, e.study_uid) == ("https://pacs.example.org:8443/dicom-web", "1.2.3")
    assert parse_endpoint("http://h/dicom-web/", need_study=False).base == "http://h/dicom-web"
    for bad in ("ftp://h/studies/1.2", "http://u:p@h/dicom-web/studies/1.2", "http://h/dicom-web",
                "http://h/dicom-web/studies/1.2.x"):
        assert code_of(lambda: parse_endpoint(bad, need_study=True)) == "DICOMWEB_URL_INVALID"  # noqa: B023 - called at once


def test_selection_rules():
    _, rules = settings()
    ct = SeriesInfo("1", "CT", "Abdomen", 40, 40, "axial", 40 * 512 * 512 * 2)
    assert verdict(ct, rules) == (None, "selected")
    assert verdict(SeriesInfo("1", "SR", "", 0, 1, None, 0), rules)[0] == "SERIES_NOT_SELECTED"
    assert verdict(ct, rules, max_bytes=1e6)[0] == "SERIES_TOO_LARGE"
    _, liver = settings("inference.series_selection.description_regex=LIVER|abdo")
    assert verdict(ct, liver)[0] is None
    assert orientation_of([1, 0, 0, 0, 1, 0]) == "axial" and orientation_of([0, 1, 0, 0, 0, -1]) == "sagittal"
    assert orientation_of([1, 0, 0, 0, 0, -1]) == "coronal" and orientation_of("bad") is None
    with pytest.raises(MedsegError):
        load_config(None, ["inference.series_selection.description_regex=(unclosed"])


def test_bare_push_means_the_same_server():
    assert optional_push_value(["predict", "--push"]) == ["predict", "--push", "same"]
    assert optional_push_value(["--push", "-o", "x"]) == ["--push", "same", "-o", "x"]
    assert optional_push_value(["--push", "http://h/dicom-web"]) == ["--push", "http://h/dicom-web"]
