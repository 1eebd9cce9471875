"""HTTP serving with the SageMaker container contract (``medseg serve-http -m MODEL [--port 8080]``).

* ``GET /ping``: 200 once the model is loaded (it loads in the background; 503 until then).
* ``POST /invocations``: the body is one image — NIfTI (``.nii`` or ``.nii.gz``), NRRD, or a zip of one DICOM
  series — recognised by its first bytes, not by a name. The answer is the label map on the input's exact grid:
  NIfTI (``application/gzip``) or, for a DICOM input, DICOM-SEG (``application/dicom``), written by the same code
  as ``medseg predict``. With ``Accept: application/json`` it is the QC verdict and reasons, the label volumes (mL)
  and the timings instead.
* Bounded: a body over ``--max-body-mb`` is 413 (refused by its ``Content-Length`` before it is read, or as soon as
  a chunked body passes the limit); more than ``--queue`` requests waiting is 503 with ``Retry-After``. Requests are
  predicted one at a time (the CPU share of the process goes to each).
* A bad input is 400 with medseg's error code in JSON ``{"error": CODE, "message": ..., "hint": ...}``; an
  unexpected failure is 500 ``INTERNAL_ERROR``. Logs name a request number, sizes, the status and the time, never
  file names or header values of the image (patient data).
* SIGTERM lets the request in flight finish, then the server stops (uvicorn's graceful shutdown).

Built on Starlette and uvicorn (both come with MLflow, which medseg already needs).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

from medseg.errors import InputError, MedsegError, describe

log = logging.getLogger(__name__)

NIFTI_MAGICS = (b"n+1\x00", b"ni1\x00", b"n+2\x00")


def sniff(body: bytes) -> str:
    """The kind of an uploaded image: ``nifti``, ``nifti-gz``, ``nrrd`` or ``dicom-zip``.

    Raises:
        InputError: ``FORMAT_UNSUPPORTED`` for anything else (an empty body included).

    Examples:
        >>> sniff(b"NRRD0004\\n"), sniff(b"PK\\x03\\x04rest"), sniff(b"\\x1f\\x8b\\x08rest")
        ('nrrd', 'dicom-zip', 'nifti-gz')
    """
    if body[:2] == b"\x1f\x8b":
        return "nifti-gz"
    if body[:4] == b"NRRD":
        return "nrrd"
    if body[:4] == b"PK\x03\x04":
        return "dicom-zip"
    if len(body) >= 348 and (body[344:348] in NIFTI_MAGICS or body[4:8] in NIFTI_MAGICS):
        return "nifti"
    raise InputError("FORMAT_UNSUPPORTED", f"the request body ({len(body)} bytes) is not a NIfTI, NRRD or zip of a "
                     "DICOM series", "POST the image file itself as the body")


def _unzip_series(body: bytes, folder: Path, max_bytes: int) -> Path:
    """Extracts a zip's files (flat, by index: no name from the archive reaches the disk) into ``folder``.

    Raises:
        InputError: ``INPUT_UNREADABLE`` for a broken archive; ``REQUEST_TOO_LARGE`` when it unpacks to more than
            ``max_bytes`` (a zip bomb).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if sum(m.file_size for m in members) > max_bytes:
                raise InputError("REQUEST_TOO_LARGE", "the zip unpacks to more than the body limit",
                                 "send one DICOM series")
            for index, member in enumerate(members):
                (folder / f"{index:06d}.dcm").write_bytes(archive.read(member))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise InputError("INPUT_UNREADABLE", f"the zip cannot be read ({describe(exc)})", "send a valid zip") from None
    if not members:
        raise InputError("INPUT_UNREADABLE", "the zip holds no files", "send a zip of one DICOM series")
    return folder


class Service:
    """The model and the one-at-a-time prediction behind the endpoints.

    Args:
        model_dir: The model folder (loaded in a background thread by :meth:`load`).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        max_body_bytes: Largest request body (and largest unpacked zip).
        queue: Requests that may wait for the one being predicted; more are answered 503.
    """

    def __init__(self, model_dir: Path, device: str = "auto", max_body_bytes: int = 512 * 2**20, queue: int = 2) -> None:
        self.model_dir, self.device = Path(model_dir), device
        self.max_body_bytes, self.queue = max_body_bytes, queue
        self.predictor: Any = None
        self.load_error: MedsegError | None = None
        self._compute = threading.Lock()
        self._admitted = threading.Semaphore(queue + 1)  # the one in flight and the waiting ones
        self._ids = itertools.count(1)

    def load(self) -> None:
        from medseg.inference.predictor import Predictor

        try:
            self.predictor = Predictor.from_model_dir(self.model_dir, self.device)
        except MedsegError as exc:
            self.load_error = exc
            log.error("model not loaded: %s", exc.one_line())

    def admit(self) -> bool:
        return self._admitted.acquire(blocking=False)

    def release(self) -> None:
        self._admitted.release()

    def next_id(self) -> int:
        return next(self._ids)

    def predict(self, body: bytes, want_json: bool) -> tuple[bytes, str]:
        """Predicts one uploaded image; returns ``(content, media type)``.

        Raises:
            MedsegError: a coded refusal of the input (answered 400).
        """
        from medseg.inference.formats import OUTPUT_FORMATS
        from medseg.inference.outputs import label_volumes_ml, producer_for
        from medseg.io.readers import read_volume

        kind = sniff(body)
        with tempfile.TemporaryDirectory(prefix="medseg-http-") as tmp:
            root = Path(tmp)
            if kind == "dicom-zip":
                (root / "series").mkdir()
                source = _unzip_series(body, root / "series", self.max_body_bytes)
            else:
                source = root / {"nifti": "image.nii", "nifti-gz": "image.nii.gz", "nrrd": "image.nrrd"}[kind]
                source.write_bytes(body)
            start = time.perf_counter()
            with self._compute:
                waited = time.perf_counter() - start
                volume = read_volume(source)
                read_s = time.perf_counter() - start - waited
                t = time.perf_counter()
                prediction = self.predictor.predict_case(volume)
                predict_s = time.perf_counter() - t
            labels = self.predictor.labels
            if want_json:
                answer = {"qc": prediction.qc, "volumes_ml": label_volumes_ml(prediction.labels, labels),
                          "labels": {str(k): v for k, v in labels.items()}, "shape": list(volume.spatial_shape),
                          "timings": {"queue_s": round(waited, 3), "read_s": round(read_s, 3),
                                      "predict_s": round(predict_s, 3)}}
                return json.dumps(answer, default=float).encode(), "application/json"
            dicom = kind == "dicom-zip"
            fmt = OUTPUT_FORMATS["dicom-seg" if dicom else "nifti"]
            target = root / f"labels{fmt.suffix}"
            fmt.write(prediction.labels, target, volume, labels, producer_for(self.predictor))
            return target.read_bytes(), "application/dicom" if dicom else "application/gzip"


def build_app(service: Service):
    """The Starlette application of ``service`` (``/ping``, ``/invocations``)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def refusal(status: int, code: str, message: str, hint: str | None = None, **headers: str) -> Response:
        return JSONResponse({"error": code, "message": message, "hint": hint}, status_code=status, headers=headers)

    def too_large() -> Response:
        return refusal(413, "REQUEST_TOO_LARGE", f"the body is larger than {service.max_body_bytes} bytes",
                       "send one image; medseg serve-http --max-body-mb raises the limit")

    async def ping(request: Request) -> Response:
        if service.predictor is not None:
            return JSONResponse({"status": "ok"})
        if service.load_error is not None:
            return refusal(500, service.load_error.code, service.load_error.message, service.load_error.hint)
        return refusal(503, "MODEL_LOADING", "the model is loading", None, **{"Retry-After": "2"})

    async def invocations(request: Request) -> Response:
        number, start = service.next_id(), time.perf_counter()
        if service.predictor is None:
            return await ping(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > service.max_body_bytes:
            log.info("request %d: 413 (%s bytes announced)", number, length)
            return too_large()
        if not service.admit():
            log.info("request %d: 503 (queue full)", number)
            return refusal(503, "SERVER_BUSY", f"{service.queue + 1} requests are in progress or waiting",
                           "retry later", **{"Retry-After": "5"})
        try:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > service.max_body_bytes:
                    log.info("request %d: 413 (body passed the limit)", number)
                    return too_large()
            want_json = "application/json" in request.headers.get("accept", "")
            try:
                content, media = await run_in_threadpool(service.predict, bytes(body), want_json)
            except MedsegError as exc:
                log.info("request %d: 400 %s (%d bytes)", number, exc.code, len(body))
                return refusal(400, exc.code, describe(exc), exc.hint)
            except Exception as exc:  # noqa: BLE001 - answered as a coded 500; the server keeps serving
                log.error("request %d: 500 %s", number, type(exc).__name__)
                return refusal(500, "INTERNAL_ERROR", f"{type(exc).__name__} while predicting", "report this")
            log.info("request %d: 200 %s (%d bytes in, %d out, %.2f s)", number, media, len(body), len(content),
                     time.perf_counter() - start)
            return Response(content, media_type=media)
        finally:
            service.release()

    return Starlette(routes=[Route("/ping", ping, methods=["GET"]),
                             Route("/invocations", invocations, methods=["POST"])])


def serve(service: Service, host: str = "0.0.0.0", port: int = 8080) -> None:
    """Loads the model in the background and serves until SIGTERM/SIGINT (the request in flight finishes)."""
    import signal

    import uvicorn

    threading.Thread(target=service.load, name="medseg-load", daemon=True).start()
    for signum in (signal.SIGTERM, signal.SIGINT):  # uvicorn handles them while serving and raises them again after
        signal.signal(signum, lambda *_: None)  # its graceful shutdown: that second time, nothing is left to do
    uvicorn.Server(uvicorn.Config(build_app(service), host=host, port=port, log_level="warning",
                                  timeout_graceful_shutdown=600)).run()
