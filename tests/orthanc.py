"""A real Orthanc PACS (Debian packages ``orthanc`` and ``orthanc-dicomweb``) for the tests and benchmarks/pacs.py:
started on 127.0.0.1 with free HTTP and DICOM ports and a temporary storage folder, stopped afterwards."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

BINARY = "Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def available() -> bool:
    return shutil.which(BINARY) is not None or Path("/usr/sbin/Orthanc").is_file()


def require() -> None:
    """Skips the calling test where Orthanc is not installed; fails it instead with MEDSEG_REQUIRE_ORTHANC=1 (CI)."""
    import os

    import pytest

    if not available():
        message = "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
        if os.environ.get("MEDSEG_REQUIRE_ORTHANC") == "1":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    aet: str
    process: subprocess.Popen
    folder: Path
    user: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def rest(self, method: str, path: str, **kwargs):
        response = requests.request(method, self.url + path, auth=self.user, timeout=30, **kwargs)
        response.raise_for_status()
        return response

    def upload(self, files) -> None:
        for f in files:
            self.rest("POST", "/instances", data=Path(f).read_bytes())

    def instances(self, modality: str | None = None) -> list[dict]:
        """Every stored instance's main tags (``Modality`` filter)."""
        out = []
        for series_id in self.rest("GET", "/series").json():
            series = self.rest("GET", f"/series/{series_id}").json()
            if modality and series["MainDicomTags"].get("Modality") != modality:
                continue
            out += [{"id": i, "series": series["MainDicomTags"]} for i in series["Instances"]]
        return out

    def file(self, instance_id: str) -> bytes:
        return self.rest("GET", f"/instances/{instance_id}/file").content

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start(folder: Path, *, aet: str = "ORTHANC", users: dict[str, str] | None = None,
          modalities: dict[str, list] | None = None) -> Orthanc:
    """Starts Orthanc with its DICOMweb plugin; ``users`` turns on HTTP authentication (then every request without
    those credentials gets 401); ``modalities`` are the DICOM peers it knows (``{name: [AET, host, port]}``)."""
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "medseg-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": aet, "RemoteAccessAllowed": False,
        "HttpBindAddress": "127.0.0.1",
        "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
        "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StowMaxInstances": 0},
        "DicomModalities": modalities or {}, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
        "StableAge": 1, "ConcurrentJobs": 1, "HttpVerbose": False, "StorageCompression": False,
        "SaveJobs": False, "LimitFindResults": 0, "OverwriteInstances": True,
    }
    (folder / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    binary = shutil.which(BINARY) or "/usr/sbin/Orthanc"
    log = open(folder / "orthanc.log", "wb")
    process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    server = Orthanc(http_port, dicom_port, aet, process, folder, next(iter(users.items())) if users else None)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {(folder / 'orthanc.log').read_text(errors='replace')[-2000:]}")
        try:
            requests.get(server.url + "/system", auth=server.user, timeout=2).raise_for_status()
            return server
        except requests.RequestException:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError("Orthanc did not start within 60 s")
