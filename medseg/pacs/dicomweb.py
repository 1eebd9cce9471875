"""DICOMweb in and out, through ``dicomweb-client``: pull a study (QIDO-RS series search, WADO-RS metadata and
instances), select its series, predict them as a folder would be, and push the results (STOW-RS).

* **Addresses.** A study is ``http(s)://host[:port]/<root>/studies/<StudyInstanceUID>``; ``--push`` stores to the
  same root, ``--push URL`` to another (a root or a study URL). Credentials are never part of a recorded address.
* **Authentication.** A bearer token from an environment variable (``pacs.token_env``, default
  ``MEDSEG_DICOMWEB_TOKEN``) or a file (``--token-file``, first line); never from the command line, where ``ps`` and
  shell histories show it. It is sent only in the ``Authorization`` header and never logged.
* **TLS.** Certificates are verified (``requests``' default store, or ``--ca-bundle`` for a hospital CA); there is
  no switch to turn verification off.
* **Retries.** A refused or dropped connection and 502/503/504 answers are retried with exponential backoff
  (``pacs.retries``, ``pacs.backoff_s``: urllib3's Retry under requests); a download that breaks off in the middle
  is retried whole, after removing what it had written. ``pacs.timeout_s`` bounds every wait for the server.
* **Errors.** Each failure has its code (:func:`translate`): ``DICOMWEB_UNREACHABLE``, ``DICOMWEB_TIMEOUT``,
  ``DICOMWEB_TLS``, ``DICOMWEB_UNAUTHORIZED`` (401), ``DICOMWEB_FORBIDDEN`` (403), ``DICOMWEB_STUDY_NOT_FOUND``,
  ``DICOMWEB_HTTP_ERROR``, ``DICOMWEB_PUSH_REJECTED``; a study-level failure stops the command (exit 2), a
  series-level one is recorded in the manifest and the other series go on.
* **Nothing half-stored.** Series are downloaded into a work folder inside the output folder, removed when the run
  ends; a series whose download fails is removed whole. Each case's results are pushed in one STOW-RS request and
  the server's answer (stored and failed SOP instances) is recorded per case; the local outputs always stay.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from medseg.config import PacsConfig, SeriesSelectionConfig
from medseg.errors import InputError, MedsegError, OutputError
from medseg.io.dicom_headers import uid_hash
from medseg.pacs.selection import SeriesInfo, info_from_json, verdict

log = logging.getLogger(__name__)
WORK_FOLDER = ".dicomweb-download"


@dataclass(frozen=True)
class Endpoint:
    """A DICOMweb root (``base``) and, for an input, the study. ``display`` is the address without credentials,
    query or study UID: what logs and the manifest show."""

    base: str
    study_uid: str | None
    display: str


def is_url(text: str | Path) -> bool:
    return str(text).lower().startswith(("http://", "https://"))


def parse_endpoint(text: str, need_study: bool) -> Endpoint:
    """Parses a DICOMweb study URL (``need_study``) or a root / study URL (a push target).

    Raises:
        InputError: ``DICOMWEB_URL_INVALID``.
    """
    parts = urlsplit(str(text))
    hint = "e.g. http://127.0.0.1:8042/dicom-web/studies/1.2.840.113619.2.55.3.604688119"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError("DICOMWEB_URL_INVALID", "not an http(s) DICOMweb address", hint)
    if parts.username or parts.password:
        raise InputError("DICOMWEB_URL_INVALID", "the address holds credentials",
                         "put a bearer token in $MEDSEG_DICOMWEB_TOKEN or --token-file, never in the URL")
    path = parts.path.rstrip("/")
    study_uid = None
    if "/studies/" in path + "/":
        root, _, rest = path.partition("/studies")
        study_uid = rest.strip("/").split("/")[0] or None
        path = root
    if need_study and not study_uid:
        raise InputError("DICOMWEB_URL_INVALID", "the address names no study", hint)
    if study_uid is not None and not all(p.isdigit() for p in study_uid.split(".")):
        raise InputError("DICOMWEB_URL_INVALID", "the StudyInstanceUID in the address is not a UID", hint)
    port = f":{parts.port}" if parts.port else ""
    base = urlunsplit((parts.scheme, f"{parts.hostname}{port}", path, "", ""))
    return Endpoint(base, study_uid, base)


def read_token(settings: PacsConfig, token_file: Path | None) -> str | None:
    """The bearer token: ``token_file``'s first line when given, else ``$<pacs.token_env>``, else none.

    Raises:
        InputError: ``DICOMWEB_TOKEN_INVALID`` when the file cannot be read or is empty.
    """
    if token_file is not None:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError("DICOMWEB_TOKEN_INVALID", f"the token file cannot be read ({type(exc).__name__})") from None
        if not lines or not lines[0].strip():
            raise InputError("DICOMWEB_TOKEN_INVALID", "the token file is empty")
        return lines[0].strip()
    return os.environ.get(settings.token_env) or None


def session(settings: PacsConfig, token: str | None, ca_bundle: Path | None = None):
    """A requests session: bearer token, TLS verification (``ca_bundle`` or the default store) and retries of
    connection errors and 502/503/504 with exponential backoff."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    s = requests.Session()
    s.verify = str(ca_bundle) if ca_bundle else True
    retry = Retry(total=settings.retries, connect=settings.retries, read=settings.retries, status=settings.retries,
                  backoff_factor=settings.backoff_s, status_forcelist=(502, 503, 504),
                  allowed_methods=frozenset({"GET", "HEAD"}), raise_on_status=False, respect_retry_after_header=True)
    adapter = HTTPAdapter(max_retries=retry)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    if token:
        s.headers["Authorization"] = f"Bearer {token}"
    return s


def client(endpoint: Endpoint, settings: PacsConfig, http_session):
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url=endpoint.base, session=http_session, timeout=settings.timeout_s)


def translate(exc: BaseException, endpoint: Endpoint, what: str) -> MedsegError:
    """A requests / dicomweb-client failure as a coded error (the message names the server, never the token)."""
    import requests

    where = f"{what} at {endpoint.display}"
    if isinstance(exc, MedsegError):
        return exc
    if isinstance(exc, requests.exceptions.SSLError):
        return InputError("DICOMWEB_TLS", f"{where}: the server's TLS certificate is not trusted",
                          "give the hospital CA's certificate with --ca-bundle")
    if isinstance(exc, (requests.exceptions.ReadTimeout, requests.exceptions.ChunkedEncodingError)) or (
            isinstance(exc, requests.exceptions.ConnectionError) and "timed out" in str(exc).lower()
            and not isinstance(exc, requests.exceptions.ConnectTimeout)):
        return InputError("DICOMWEB_TIMEOUT", f"{where}: the server stopped answering", "raise pacs.timeout_s or retry later")
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return InputError("DICOMWEB_UNREACHABLE", f"{where}: no connection after retries",
                          "check the address and port, and that the server runs")
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return InputError("DICOMWEB_UNAUTHORIZED", f"{where}: HTTP 401 (no or wrong credentials)",
                              "set the bearer token in $MEDSEG_DICOMWEB_TOKEN (pacs.token_env) or --token-file")
        if status == 403:
            return InputError("DICOMWEB_FORBIDDEN", f"{where}: HTTP 403 (these credentials may not do this)",
                              "ask the PACS administrator for access")
        if status == 404:
            return InputError("DICOMWEB_STUDY_NOT_FOUND", f"{where}: HTTP 404", "check the StudyInstanceUID")
        return InputError("DICOMWEB_HTTP_ERROR", f"{where}: HTTP {status}")
    return InputError("DICOMWEB_HTTP_ERROR", f"{where}: {type(exc).__name__}")


@dataclass
class PulledStudy:
    """A downloaded study: the folder of its selected series and a verdict per series."""

    folder: Path
    series: list[dict] = field(default_factory=list)  # {uid hash, modality, images, status, code, reason, seconds}
    failed: list[tuple[SeriesInfo, MedsegError]] = field(default_factory=list)
    skipped: list[tuple[SeriesInfo, str, str]] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0


def _series_uid(item: dict) -> str:
    return str(item.get("0020000E", {}).get("Value", [""])[0])


def pull_study(endpoint: Endpoint, out_dir: Path, settings: PacsConfig, rules: SeriesSelectionConfig,
               http_session) -> PulledStudy:
    """Searches the study's series, applies ``rules`` and downloads every selected series into
    ``out_dir/.dicomweb-download/<uid hash>/`` (none when together they exceed ``pacs.max_study_mb``: each is then
    a ``STUDY_TOO_LARGE`` failure).

    Raises:
        InputError: ``DICOMWEB_*`` for a server that cannot be used at all (unreachable, 401, 403, TLS, timeout);
            ``DICOMWEB_STUDY_NOT_FOUND``; ``NO_SERIES_MATCHED`` (the verdicts are in the returned value's
            ``series`` when the caller catches it: see :func:`predict_study`).
    """
    start = time.perf_counter()
    web = client(endpoint, settings, http_session)
    try:
        found = web.search_for_series(study_instance_uid=endpoint.study_uid)
    except Exception as exc:  # noqa: BLE001 - translated
        raise translate(exc, endpoint, "searching the study's series") from None
    if not found:
        raise InputError("DICOMWEB_STUDY_NOT_FOUND", f"the server at {endpoint.display} holds no series of that study",
                         "check the StudyInstanceUID")
    folder = out_dir / WORK_FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pulled = PulledStudy(folder)
    max_bytes = settings.max_series_mb * 2**20
    selected: list[tuple[SeriesInfo, dict]] = []
    for item in sorted(found, key=_series_uid):
        uid = _series_uid(item)
        try:
            metadata = web.retrieve_series_metadata(endpoint.study_uid, uid)
        except Exception as exc:  # noqa: BLE001
            error = translate(exc, endpoint, "reading a series' metadata")
            if error.code in ("DICOMWEB_UNREACHABLE", "DICOMWEB_UNAUTHORIZED", "DICOMWEB_FORBIDDEN", "DICOMWEB_TLS"):
                raise error from None
            info = SeriesInfo(uid, "", "", 0, 0, None, 0)
            pulled.failed.append((info, error))
            pulled.series.append({"series": info.uid_hash, "status": "failed", "code": error.code, "reason": error.message})
            continue
        info = info_from_json(uid, metadata)
        code, reason = verdict(info, rules, max_bytes)
        record = {"series": info.uid_hash, "modality": info.modality, "images": info.n_images,
                  "instances": info.n_instances, "orientation": info.orientation}
        if code == "SERIES_TOO_LARGE":  # it matched the rules: a failure, not a choice
            pulled.failed.append((info, InputError(code, reason, "raise pacs.max_series_mb (--pacs max_series_mb=...)")))
            pulled.series.append({**record, "status": "failed", "code": code, "reason": reason})
            continue
        if code:
            pulled.skipped.append((info, code, reason))
            pulled.series.append({**record, "status": "skipped", "code": code, "reason": reason})
            continue
        selected.append((info, record))
    total = sum(info.bytes_estimate for info, _ in selected)
    if total > settings.max_study_mb * 2**20:  # refused before any download
        reason = (f"the selected series hold {total / 2**20:.0f} MB of pixels, more than pacs.max_study_mb "
                  f"{settings.max_study_mb:g}")
        for info, record in selected:
            pulled.failed.append((info, InputError("STUDY_TOO_LARGE", reason, "raise pacs.max_study_mb or narrow --select")))
            pulled.series.append({**record, "status": "failed", "code": "STUDY_TOO_LARGE", "reason": reason})
        selected = []
    for info, record in selected:
        t = time.perf_counter()
        try:
            size = _download_series(web, endpoint, info, folder / info.uid_hash, settings, max_bytes)
        except MedsegError as error:
            pulled.failed.append((info, error))
            pulled.series.append({**record, "status": "failed", "code": error.code, "reason": error.message})
            continue
        pulled.bytes += size
        pulled.series.append({**record, "status": "downloaded", "code": None, "reason": "selected",
                              "seconds": round(time.perf_counter() - t, 3), "mb": round(size / 2**20, 3)})
    pulled.seconds = round(time.perf_counter() - start, 3)
    return pulled


def _download_series(web, endpoint: Endpoint, info: SeriesInfo, target: Path, settings: PacsConfig,
                     max_bytes: float) -> int:
    """Downloads one series instance by instance (WADO-RS, streamed) into ``target``; a broken-off download is
    removed and retried whole (``pacs.retries``, backoff). Returns the bytes written.

    Raises:
        InputError: the translated failure after the last try; ``SERIES_TOO_LARGE`` when the instances exceed
            the cap (the estimate from the metadata can be wrong).
    """
    for attempt in range(settings.retries + 1):
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        written = 0
        try:
            for n, dataset in enumerate(web.iter_series(endpoint.study_uid, info.uid)):
                path = target / f"{n:06d}.dcm"
                dataset.save_as(path, enforce_file_format=True)
                written += path.stat().st_size
                if written > max_bytes + 2**20:
                    raise InputError("SERIES_TOO_LARGE", f"series {info.uid_hash} exceeds pacs.max_series_mb "
                                     f"({settings.max_series_mb:g} MB) while downloading")
            return written
        except Exception as exc:  # noqa: BLE001 - translated, maybe retried
            shutil.rmtree(target, ignore_errors=True)
            error = translate(exc, endpoint, f"downloading series {info.uid_hash}")
            if error.code not in ("DICOMWEB_TIMEOUT", "DICOMWEB_UNREACHABLE") or attempt == settings.retries:
                raise error from None
            wait = settings.backoff_s * 2**attempt
            log.warning("series %s: %s; retrying in %.1f s", info.uid_hash, error.code, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def push_files(files: list[Path], endpoint: Endpoint, settings: PacsConfig, http_session) -> dict:
    """Stores ``files`` (one case's DICOM results) in one STOW-RS request (:func:`medseg.pacs.delivery.deliver`;
    connection errors and 502/503/504 are retried by the session, ``pacs.retries`` times from ``pacs.backoff_s``)
    and returns the ``delivery`` record. Never raises for the server's answer: a refusal is the returned record
    (``DICOMWEB_PUSH_REJECTED`` and the HTTP codes)."""
    from medseg.pacs.delivery import deliver

    def send(datasets: list) -> None:
        try:
            answer = client(endpoint, settings, http_session).store_instances(datasets=datasets)
        except Exception as exc:  # noqa: BLE001 - translated to the code a user acts on
            error = translate(exc, endpoint, "storing the results")
            if error.code in ("DICOMWEB_HTTP_ERROR", "DICOMWEB_STUDY_NOT_FOUND"):
                error = OutputError("DICOMWEB_PUSH_REJECTED", error.message, "see the server's log for the reason")
            raise error from None
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reasons = sorted({int(item.get("FailureReason", 0)) for item in failed})
            raise OutputError("DICOMWEB_PUSH_REJECTED", f"the server refused {len(failed)} of {len(files)} instance(s) "
                              f"(failure reason {', '.join(hex(r) for r in reasons)})")

    return deliver(files, endpoint.display, send, 0, settings.backoff_s, "DICOMWEB_PUSH_REJECTED")


def series_case_id(info: SeriesInfo) -> str:
    """The case ID of a series that was not predicted (left out or not downloaded)."""
    return f"series_{info.uid_hash}"




def result_files(result, out_dir: Path) -> list[Path]:
    """The DICOM files (SEG, RTSTRUCT) among a case's recorded outputs."""
    from medseg.inference.formats import is_dicom_object

    return [out_dir / record["file"] for kind, record in sorted(result.outputs.items()) if is_dicom_object(record["file"])]


def predict_study(predictor, url: str, out_dir: Path, options, settings: PacsConfig, rules: SeriesSelectionConfig, *,
                  token: str | None = None, ca_bundle: Path | None = None, push: str | None = None) -> list:
    """``medseg predict -i URL``: pulls the study, predicts every selected series into ``out_dir`` (the folder
    runner: same manifest, per-series isolation, resume) and with ``push`` (``"same"`` or a DICOMweb address)
    stores each case's DICOM results by STOW-RS, recording the answer in the case's ``delivery``.

    The manifest's ``source`` names the server (no credentials), a hash of the study UID and a verdict per series
    (selected, left out with the rule, failed with the code). Series left out are ``skipped`` cases, series whose
    download failed ``failed`` cases.

    Raises:
        InputError: ``DICOMWEB_*`` when the server cannot be used; ``NO_SERIES_MATCHED`` (after writing the
            manifest with every series' verdict).
    """
    from medseg.inference.discovery import CaseInput, discover
    from medseg.inference.runner import prepare_output, run_cases, write_manifest

    endpoint = parse_endpoint(url, need_study=True)
    target = None if push is None else endpoint if push == "same" else parse_endpoint(push, need_study=False)
    http = session(settings, token, ca_bundle)
    prepare_output(out_dir, options)  # before any download: a folder that cannot take the results is refused now
    pulled = pull_study(endpoint, out_dir, settings, rules, http)
    try:
        downloaded = any(pulled.folder.iterdir())
        found = discover(pulled.folder) if downloaded else None
        cases = list(found.cases) if found else []
        for info, code, reason in pulled.skipped:
            cases.append(CaseInput(series_case_id(info), Path(info.uid_hash), status="skipped", error_code=code,
                                   error=f"{code}: {reason}", recorded=f"DICOMweb series {info.uid_hash}"))
        for info, error in pulled.failed:
            cases.append(CaseInput(series_case_id(info), Path(info.uid_hash), status="failed", error_code=error.code,
                                   error=error.one_line(), recorded=f"DICOMweb series {info.uid_hash}"))
        source = {"dicomweb": {"server": endpoint.display, "study": uid_hash(endpoint.study_uid or ""),
                               "download_s": pulled.seconds, "download_mb": round(pulled.bytes / 2**20, 3),
                               "series": pulled.series}}
        if target is not None:
            source["dicomweb"]["push_to"] = target.display
        results = run_cases(predictor, cases, out_dir, options, found.ignored if found else {}, extra={"source": source},
                            roots=[pulled.folder])
        if not downloaded and not pulled.failed:
            raise InputError("NO_SERIES_MATCHED", f"none of the study's {len(pulled.skipped)} series matched "
                             "inference.series_selection (each series' reason is in manifest.json)",
                             "adjust the rules with --select KEY=VALUE, e.g. --select modalities=[CT]")
        if target is not None:
            for result in results:
                if result.status == "ok" and not result.resumed:
                    files = result_files(result, out_dir)
                    if not files:
                        result.notes.append("nothing pushed: no DICOM output (use --output-type dicom-seg or rtstruct)")
                        continue
                    result.delivery = push_files(files, target, settings, http)
                    if result.delivery["status"] == "failed":
                        log.error("case %s: push failed: %s", result.case_id, result.delivery["error"])
            write_manifest(out_dir, options, predictor, results, found.ignored if found else {}, {"source": source})
        return results
    finally:
        shutil.rmtree(pulled.folder, ignore_errors=True)
