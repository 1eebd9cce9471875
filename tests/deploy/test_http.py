"""medseg serve-http as a subprocess, talked to with a real HTTP client (requests) and raw sockets: the SageMaker
contract (/ping, /invocations), answers equal to medseg predict's, coded refusals, the bounded queue, SIGTERM."""

import gzip
import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests

from medseg.io.dicom_write import write_dicom_series
from medseg.io.readers import read_volume


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Polls GET /ping until 200 (the model loaded); fails when the server process ends or time runs out."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.2)
    pytest.fail("the server did not become ready")


class Server:
    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"

    def post(self, body: bytes, **headers: str) -> requests.Response:
        return requests.post(f"{self.url}/invocations", data=body, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def server(smoke_model: Path) -> Iterator[Server]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medseg", "serve-http", "-m", str(smoke_model), "--host", "127.0.0.1",
                             "--port", str(port), "-d", "cpu", "--queue", "1", "--max-body-mb", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = Server(proc, port)
    _wait_ready(port, proc)
    yield server
    proc.terminate()
    proc.wait(timeout=60)


def _predicted(model: Path, source: Path, out: Path, *extra: str) -> Path:
    done = subprocess.run([sys.executable, "-m", "medseg", "-q", "predict", "-i", str(source), "-o", str(out), "-m",
                           str(model), "-d", "cpu", *extra], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def test_ping_and_nifti_answers_equal_medseg_predict(server: Server, smoke_model: Path, tiny_dataset: Path,
                                                     tmp_path: Path):
    assert requests.get(f"{server.url}/ping", timeout=5).json() == {"status": "ok"}
    image = sorted((tiny_dataset / "imagesTs").iterdir())[0]
    expected = nib.load(next(_predicted(smoke_model, image, tmp_path / "cli").glob("*.nii.gz")))
    for body in (image.read_bytes(), gzip.decompress(image.read_bytes())):  # .nii.gz and plain .nii
        answer = server.post(body)
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/gzip"
        (tmp_path / "answer.nii.gz").write_bytes(answer.content)
        got = nib.load(tmp_path / "answer.nii.gz")
        assert np.array_equal(np.asarray(got.dataobj), np.asarray(expected.dataobj))
        assert np.allclose(got.affine, expected.affine)

    facts = server.post(image.read_bytes(), Accept="application/json").json()
    assert facts["qc"]["verdict"] in ("ok", "review") and set(facts["volumes_ml"]) == {"organ", "lesion"}
    assert facts["shape"] == list(expected.shape) and facts["timings"]["predict_s"] > 0


def test_nrrd_and_a_zipped_dicom_series(server: Server, smoke_model: Path, tiny_dataset: Path, tmp_path: Path):
    import SimpleITK as sitk

    image = sorted((tiny_dataset / "imagesTs").iterdir())[0]
    sitk.WriteImage(sitk.ReadImage(str(image)), str(tmp_path / "image.nrrd"))
    answer = server.post((tmp_path / "image.nrrd").read_bytes())
    assert answer.status_code == 200, answer.text

    series = tmp_path / "series"
    volume = read_volume(image)
    volume = volume.with_array(np.clip(volume.array, -1000, 2000).astype(np.int16))
    write_dicom_series(volume, series, patient_name="Doe^Jane", patient_id="PID-123")
    expected = pydicom.dcmread(next(_predicted(smoke_model, series, tmp_path / "cli", "-t", "dicom-seg").glob("*.dcm")))
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as archive:
        for path in sorted(series.iterdir()):
            archive.write(path, f"Doe_Jane/{path.name}")  # a patient-named folder inside the zip
    answer = server.post(packed.getvalue())
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom", answer.text
    seg = pydicom.dcmread(io.BytesIO(answer.content))
    assert seg.Modality == "SEG" and seg.SeriesInstanceUID != expected.SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [s.SegmentLabel for s in expected.SegmentSequence]
    assert np.array_equal(seg.pixel_array, expected.pixel_array)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == expected.ReferencedSeriesSequence[0].SeriesInstanceUID


def test_bad_and_oversized_bodies_are_refused_with_codes(server: Server):
    answer = server.post(b"hello, not an image")
    assert answer.status_code == 400 and answer.json()["error"] == "FORMAT_UNSUPPORTED"
    broken = server.post(b"\x1f\x8b\x08\x00" + os.urandom(2000))  # gzip magic, garbage after
    assert broken.status_code == 400 and broken.json()["error"], broken.text
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.dcm", b"\x00" * (9 * 2**20))  # 9 MiB unpacked, a few kB packed
    answer = server.post(bomb.getvalue())
    assert answer.status_code == 400 and answer.json()["error"] == "REQUEST_TOO_LARGE"
    big = server.post(b"\x00" * (9 * 2**20))
    assert big.status_code == 413 and big.json()["error"] == "REQUEST_TOO_LARGE"
    assert requests.get(f"{server.url}/ping", timeout=5).status_code == 200  # still serving


def _stalled(port: int, total: int, sent: bytes) -> socket.socket:
    """A request whose headers and first bytes are sent, the rest withheld: it holds its place in the queue."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n\r\n".encode() + sent)
    return sock


def _answer(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_the_queue_is_bounded_and_concurrent_requests_agree(server: Server, tiny_dataset: Path):
    body = sorted((tiny_dataset / "imagesTs").iterdir())[0].read_bytes()
    held = [_stalled(server.port, len(body), body[:100]) for _ in range(2)]  # queue 1: one in progress + one waiting
    time.sleep(0.5)
    busy = server.post(body)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "5" and busy.json()["error"] == "SERVER_BUSY"
    for sock in held:
        sock.sendall(body[100:])
    assert all(_answer(sock).startswith(b"HTTP/1.1 200") for sock in held)
    with ThreadPoolExecutor(2) as pool:  # two at once fit the queue: both answered, identically
        answers = list(pool.map(lambda _: server.post(body), range(2)))
    assert [a.status_code for a in answers] == [200, 200] and answers[0].content == answers[1].content


def test_sigterm_finishes_the_request_in_flight(smoke_model: Path, tiny_dataset: Path, tmp_path: Path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medseg", "serve-http", "-m", str(smoke_model), "--host", "127.0.0.1",
                             "--port", str(port), "-d", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(port, proc)
        body = sorted((tiny_dataset / "imagesTs").iterdir())[0].read_bytes()
        sock = _stalled(port, len(body), body[:100])
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        sock.sendall(body[100:])
        answer = _answer(sock)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        head, _, content = answer.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        assert len(content) == length  # the whole label map
        assert proc.wait(timeout=60) == 0
        _, stderr = proc.communicate(timeout=10)
        assert "Doe" not in stderr and "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()


def test_no_patient_data_in_the_server_log(server: Server, tmp_path: Path, tiny_dataset: Path):
    image = read_volume(sorted((tiny_dataset / "imagesTs").iterdir())[0])
    series = tmp_path / "s"
    write_dicom_series(image.with_array(np.clip(image.array, -1000, 2000).astype(np.int16)), series,
                       patient_name="Canary^Patient", patient_id="CANARY-42")
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as archive:
        for path in sorted(series.iterdir()):
            archive.write(path, f"CANARY-42/{path.name}")
    assert server.post(packed.getvalue()).status_code == 200
    assert server.post(b"CANARY-42 garbage").status_code == 400
    server.proc.send_signal(signal.SIGTERM)
    _, stderr = server.proc.communicate(timeout=60)
    assert "CANARY" not in stderr and "Canary" not in stderr
    assert "request" in stderr  # it does log each request


def test_the_container_entry_point_serves_sagemakers_model_dir(smoke_model: Path):
    """docker/sagemaker/serve as SageMaker runs it: the model in SM_MODEL_DIR (/opt/ml/model), the port from the
    environment (8080 by default). The Docker build itself is not run here (no Docker on the CI machines)."""
    port = _free_port()
    script = Path(__file__).resolve().parents[2] / "docker" / "sagemaker" / "serve"
    env = {**os.environ, "SM_MODEL_DIR": str(smoke_model), "SAGEMAKER_BIND_TO_PORT": str(port),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(["sh", str(script), "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        _wait_ready(port, proc)
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
