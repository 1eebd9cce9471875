"""``medseg serve``: a DICOM listener (pynetdicom C-STORE SCP) that segments each series it receives and sends the
results on by C-STORE.

* **Receiving.** Every storage SOP class is accepted (and Verification, for ``echoscu``). Instances are written as
  received (no re-encoding) to ``OUT/.incoming/<series hash>/<instance hash>.dcm``, atomically; file and folder
  names are hashes of UIDs, never patient tags.
* **When a series is complete.** DICOM has no end-of-series message: a series is complete when no instance of it
  came for ``pacs.idle_s`` seconds. It is then checked against ``inference.series_selection``, predicted by the
  folder runner (same manifest, per-series isolation) and its DICOM results are C-STOREd to ``--dest``
  (``pacs.send_retries`` retries with backoff; the answer is the case's ``delivery``). Its received files are
  deleted once it is processed.
* **It keeps going.** A malformed object is refused (status 0xC210) and recorded; an aborted association is
  recorded and what arrived is processed when it goes idle (a missing slice then fails the case with its code);
  a failing case is a failed row of the manifest. Nothing of that stops the listener.
* **Bounded.** At most ``pacs.max_queue`` series are held (receiving or waiting) and ``pacs.max_incoming_mb`` of
  received files; a series over ``pacs.max_series_mb`` is refused. A refused store answers 0xA700 (out of
  resources), so the sender knows and can retry later, and is recorded.
* **Security.** Binds 127.0.0.1 unless ``--host`` says otherwise; with ``pacs.allowed_calling_aets`` set, other
  calling AE titles are rejected at association (recorded). DICOM associations are not encrypted: expose the port
  only inside the hospital network (or behind a TLS tunnel).
* **Stopping.** SIGTERM or SIGINT stops accepting associations, lets the case in progress finish and records the
  series not yet processed as ``pending`` (``LISTENER_STOPPED``); their files stay in ``.incoming`` and are
  processed after the next start.

``manifest.json`` holds every case since the start (cumulative), plus ``listener``: counts of received, refused,
malformed and aborted, and the recent events (each with its code, never patient data).
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.config import PacsConfig, SeriesSelectionConfig
from medseg.errors import InputError, MedsegError, describe
from medseg.io.dicom_headers import uid_hash

if TYPE_CHECKING:  # annotations only: the listener imports the inference stack when it starts
    from medseg.inference.predictor import Predictor
    from medseg.inference.runner import RunOptions

log = logging.getLogger(__name__)
INCOMING = ".incoming"
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC210
MAX_EVENTS = 200  # the manifest keeps the latest events (counts cover all)


@dataclass(frozen=True)
class Destination:
    """A DICOM peer ``AE@host:port``."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def check_ae_title(title: str, what: str) -> str:
    """``title`` when DICOM allows it (1-16 characters, no backslash or control characters, not only spaces).

    Raises:
        InputError: ``DEST_INVALID``.
    """
    if not 0 < len(title) <= 16 or not title.strip() or re.search(r"[\\\x00-\x1f]", title):
        raise InputError("DEST_INVALID", f"{what} {title!r} is not a DICOM AE title", "1 to 16 characters, no backslash")
    return title


def parse_dest(text: str) -> Destination:
    """``"PACS@10.0.0.5:104"`` -> :class:`Destination`.

    Raises:
        InputError: ``DEST_INVALID``.
    """
    match = re.fullmatch(r"([^@]+)@(\[[^\]]+\]|[^:]+):(\d+)", text.strip())
    if not match or not 0 < int(match.group(3)) < 65536:
        raise InputError("DEST_INVALID", f"--dest {text!r} is not AE@host:port", "e.g. --dest ORTHANC@127.0.0.1:4242")
    return Destination(check_ae_title(match.group(1), "--dest AE title"), match.group(2).strip("[]"), int(match.group(3)))


def send_files(files: list[Path], dest: Destination, calling_ae: str, settings: PacsConfig) -> dict:
    """C-STOREs ``files`` to ``dest`` in one association (:func:`medseg.pacs.delivery.deliver`: retried whole,
    ``pacs.send_retries`` times from ``pacs.backoff_s``) and returns the ``delivery`` record."""
    from pynetdicom import AE

    from medseg.pacs.delivery import Retriable, deliver

    def send(datasets: list) -> None:
        ae = AE(ae_title=calling_ae)
        for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
            ae.add_requested_context(sop_class)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.dimse_timeout_s
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            raise Retriable("association rejected" if assoc.is_rejected else "no association (peer unreachable or aborted)")
        try:
            statuses = [assoc.send_c_store(ds) for ds in datasets]
        finally:
            assoc.release()
        bad = [s for s in statuses if not s or int(s.Status) not in (0x0000, 0xB000, 0xB007, 0xB006)]
        if bad:
            raise Retriable("refused: status " + ", ".join(hex(int(s.Status)) if s else "none (connection lost)" for s in bad))

    return deliver(files, str(dest), send, settings.send_retries, settings.backoff_s, "DICOM_SEND_FAILED")


@dataclass
class _Series:
    folder: Path
    last: float
    instances: int = 0
    bytes: int = 0
    refused: str | None = None  # SERIES_TOO_LARGE once over the cap


@dataclass
class Listener:
    """The SCP, its receiving state and the worker that segments complete series (see the module docstring)."""

    predictor: Predictor
    out_dir: Path
    settings: PacsConfig
    rules: SeriesSelectionConfig
    run_options: RunOptions
    ae_title: str = "MEDSEG"
    host: str = "127.0.0.1"
    port: int = 11112
    dest: Destination | None = None
    results: list = field(default_factory=list)
    counts: dict = field(default_factory=lambda: {"received": 0, "refused": 0, "malformed": 0, "aborted": 0,
                                                  "rejected_associations": 0, "series_done": 0})
    events: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.incoming = self.out_dir / INCOMING
        self._lock = threading.Lock()
        self._series: dict[str, _Series] = {}
        self._stop = threading.Event()
        self._busy: str | None = None
        self._server: Any = None  # pynetdicom's ThreadedAssociationServer while listening
        self._worker: threading.Thread | None = None
        check_ae_title(self.ae_title, "--ae-title")
        for title in self.settings.allowed_calling_aets:
            check_ae_title(title, "pacs.allowed_calling_aets entry")

    # ------------------------------------------------------------------------------------------- state

    def _event(self, code: str, text: str, **extra) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": code, "event": text, **extra}
        with self._lock:
            self.events.append(entry)
            del self.events[:-MAX_EVENTS]
        log.warning("%s: %s", code, text)

    def _held_bytes(self) -> int:
        return sum(s.bytes for s in self._series.values())

    def _recover(self) -> None:
        """Series left in ``.incoming`` by an earlier run (stopped, crashed) are processed after ``idle_s``."""
        import pydicom

        from medseg.fsutil import remove_stale_partials

        self.incoming.mkdir(parents=True, exist_ok=True)
        for folder in sorted(p for p in self.incoming.iterdir() if p.is_dir()):
            files = [f for f in folder.iterdir() if f.suffix == ".dcm"]
            remove_stale_partials(folder, recursive=False)
            key = None
            for f in files:  # keyed by its series UID, so that more instances of it join this folder
                try:
                    key = str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                              .SeriesInstanceUID)
                    break
                except Exception:  # noqa: BLE001 - an unreadable leftover is processed (and recorded) as it is
                    continue
            if files:
                self._series[key or f"recovered:{folder.name}"] = _Series(folder, time.monotonic(), len(files),
                                                                          sum(f.stat().st_size for f in files))
            else:
                shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------------------------------- handlers

    def on_store(self, event) -> int:
        """EVT_C_STORE: keep the instance, or refuse it with a status and a recorded event."""
        from medseg.fsutil import atomic_write

        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            dataset = event.dataset
            series_uid, sop_uid = str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID)
            if not series_uid or not sop_uid:
                raise ValueError("empty UID")
            data = event.encoded_dataset()
        except Exception as exc:  # noqa: BLE001 - any undecodable object is refused and recorded
            with self._lock:
                self.counts["malformed"] += 1
            self._event("LISTENER_MALFORMED", f"refused an object from {calling}: {type(exc).__name__}")
            return CANNOT_UNDERSTAND
        size = len(data)
        with self._lock:
            state = self._series.get(series_uid)
            refusal = None
            if state is None and len(self._series) + (self._busy is not None) >= self.settings.max_queue:
                refusal = ("LISTENER_QUEUE_FULL", f"{self.settings.max_queue} series held (pacs.max_queue)")
            elif self._held_bytes() + size > self.settings.max_incoming_mb * 2**20:
                refusal = ("LISTENER_DISK_FULL", f"received files hold pacs.max_incoming_mb ({self.settings.max_incoming_mb:g} MB)")
            elif state is not None and state.bytes + size > self.settings.max_series_mb * 2**20:
                state.refused = "SERIES_TOO_LARGE"
                refusal = ("SERIES_TOO_LARGE", f"series {uid_hash(series_uid)} exceeds pacs.max_series_mb")
            if refusal is None and state is None:
                state = self._series[series_uid] = _Series(self.incoming / uid_hash(series_uid, 16), time.monotonic())
            if refusal is None:
                assert state is not None  # found or created above
                state.instances += 1
                state.bytes += size
                state.last = time.monotonic()
                self.counts["received"] += 1
            else:
                self.counts["refused"] += 1
        if refusal is not None:
            self._event(refusal[0], f"refused an instance from {calling}: {refusal[1]}")
            return OUT_OF_RESOURCES
        assert state is not None
        state.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(state.folder / f"{uid_hash(sop_uid, 16)}.dcm", lambda tmp: tmp.write_bytes(data))
        with self._lock:
            state.last = time.monotonic()
        return SUCCESS

    def on_aborted(self, event) -> None:
        with self._lock:
            self.counts["aborted"] += 1
        self._event("LISTENER_ABORTED", f"association from {str(event.assoc.requestor.ae_title).strip()} aborted; "
                    "what arrived is processed when its series goes idle")

    def on_rejected(self, event) -> None:
        with self._lock:
            self.counts["rejected_associations"] += 1
        self._event("LISTENER_CALLER_REJECTED", f"association from calling AE {str(event.assoc.requestor.ae_title).strip()!r} "
                    "rejected (not in pacs.allowed_calling_aets)")

    # ------------------------------------------------------------------------------------------- processing

    def _extra(self) -> dict:
        with self._lock:
            return {"listener": {"ae_title": self.ae_title, "port": self.port, "dest": str(self.dest) if self.dest else None,
                                 "counts": dict(self.counts), "events": list(self.events)}}

    def _write_manifest(self) -> None:
        from medseg.inference.runner import write_manifest

        write_manifest(self.out_dir, self.run_options, self.predictor, self.results, {}, self._extra())

    def process(self, state: _Series) -> None:
        """Segments one complete series, sends its results and removes its received files."""
        import pydicom

        from medseg.inference.discovery import CaseInput, discover
        from medseg.inference.runner import run_cases
        from medseg.pacs.dicomweb import result_files
        from medseg.pacs.selection import info_from_series, verdict

        name = f"series_{state.folder.name[:10]}"

        def unpredicted(status: str, code: str, error: str) -> list[CaseInput]:
            return [CaseInput(name, state.folder, status=status, error_code=code, error=error, recorded=f"DICOM {name}")]

        try:
            if state.refused:
                cases = unpredicted("failed", state.refused,
                                    f"{state.refused}: series over pacs.max_series_mb; its instances were refused")
            else:
                cases = discover(state.folder).cases
                for case in cases:
                    if case.series is None or case.status != "pending":
                        continue
                    header = pydicom.dcmread(case.path, stop_before_pixels=True, specific_tags=["SeriesDescription"])
                    info = info_from_series(case.series, str(header.get("SeriesDescription", "")))
                    code, reason = verdict(info, self.rules, self.settings.max_series_mb * 2**20)
                    if code:
                        case.status, case.error_code, case.error = "skipped", code, f"{code}: {reason}"
        except MedsegError as exc:
            cases = unpredicted("failed", exc.code, exc.one_line())
        except Exception as exc:  # noqa: BLE001 - the listener keeps going
            cases = unpredicted("failed", "INTERNAL_ERROR", f"INTERNAL_ERROR: {type(exc).__name__}")
        prior = list(self.results)
        try:
            self.results = run_cases(self.predictor, cases, self.out_dir, self.run_options, prior=prior, extra=self._extra(),
                                     roots=[self.incoming])
        except Exception as exc:  # noqa: BLE001 - recorded, the listener keeps going
            log.error("series %s could not be processed: %s", name, describe(exc, roots=[self.incoming]))
            self._event("INTERNAL_ERROR", f"series {name} could not be processed: {type(exc).__name__}")
            self.results = prior
        for result in self.results[len(prior):]:
            if result.status == "ok" and self.dest is not None:
                files = result_files(result, self.out_dir)
                if files:
                    result.delivery = send_files(files, self.dest, self.ae_title, self.settings)
                    if result.delivery["status"] == "failed":
                        log.error("case %s: %s", result.case_id, result.delivery["error"])
                else:
                    result.notes.append("nothing sent: no DICOM output (use --output-type dicom-seg or rtstruct)")
        with self._lock:
            self.counts["series_done"] += 1
        self._write_manifest()
        shutil.rmtree(state.folder, ignore_errors=True)

    def _next_idle(self) -> _Series | None:
        now = time.monotonic()
        with self._lock:
            for key, state in sorted(self._series.items(), key=lambda kv: kv[1].last):
                if now - state.last >= self.settings.idle_s:
                    self._busy = key
                    return self._series.pop(key)
        return None

    def _work(self) -> None:
        while not self._stop.is_set():
            state = self._next_idle()
            if state is None:
                self._stop.wait(0.2)
                continue
            try:
                self.process(state)
            finally:
                with self._lock:
                    self._busy = None

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Binds and starts serving (non-blocking) and starts the worker.

        Raises:
            InputError: ``LISTENER_PORT_IN_USE``.
        """
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import

        self._recover()
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.maximum_associations = 4
        ae.maximum_pdu_size = 0  # unlimited: the default 16 kB PDUs cost pynetdicom ~45 ms per CT slice
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.settings.dimse_timeout_s
        if self.settings.allowed_calling_aets:
            ae.require_calling_aet = list(self.settings.allowed_calling_aets)
        handlers: Any = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_ABORTED, self.on_aborted), (evt.EVT_REJECTED, self.on_rejected)]
        try:
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise InputError("LISTENER_PORT_IN_USE", f"cannot listen on {self.host}:{self.port} ({exc.strerror})",
                             "choose another --port (ports below 1024 need privileges)") from None
        self.port = self._server.server_address[1]
        self._write_manifest()
        self._worker = threading.Thread(target=self._work, name="medseg-serve-worker", daemon=True)
        self._worker.start()
        log.info("listening as %s on %s:%d%s", self.ae_title, self.host, self.port,
                 f", results to {self.dest}" if self.dest else "")

    def stop(self) -> None:
        """Stops accepting, lets the case in progress finish, records what was not processed (kept for the next
        start) and writes the manifest."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        if self._worker is not None:
            self._worker.join()
        from medseg.inference.manifest import CaseResult

        with self._lock:
            left = list(self._series.values())
            self._series.clear()
        for state in left:
            name = f"series_{state.folder.name[:10]}"
            self.results.append(CaseResult(name, f"DICOM {name}", "pending", error_code="LISTENER_STOPPED",
                                           error=f"LISTENER_STOPPED: {state.instances} instance(s) received, not "
                                                 "segmented before the listener stopped; processed after the next start"))
        self._write_manifest()

    def wait(self) -> None:
        """Blocks until :meth:`request_stop` (a signal handler) is called."""
        while not self._stop.is_set():
            self._stop.wait(0.5)

    def request_stop(self, *_args) -> None:
        self._stop.set()
