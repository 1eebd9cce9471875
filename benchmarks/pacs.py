"""PACS paths against a real Orthanc: the DICOMweb overhead and the listener's latency.

    .venv/bin/python benchmarks/pacs.py [--shape 256 256 96] [--rounds 3] [--idle 1.0] [--dest orthanc|pynetdicom]
                                        [--device auto] [--out NAME]

Set-up: one CT-like series (``--shape``, int16, written as single-frame DICOM) in an Orthanc started on 127.0.0.1
(Debian ``orthanc`` + ``orthanc-dicomweb``, as in the tests), and a seeded random 3D UNet 8-16-32-64 model folder
(benchmarks/inference.py: what matters here is the I/O around the network, not what it predicts).

(a) **DICOMweb overhead**: ``medseg predict -t dicom-seg`` on the series read from a folder (the peer) against
    ``medseg predict -i http://.../dicom-web/studies/<UID>`` (QIDO + WADO-RS download + the same prediction) and the
    same with ``--push`` (STOW-RS of the SEG). Both as a user runs them: one process each, start-up included.
    Rounds run the three back to back, rotating which goes first; figures are medians, ratios medians of
    within-round ratios. Goal (issue 15): DICOMweb / folder <= 1.2.
(b) **Listener latency**: ``medseg serve --dest ...`` with ``pacs.idle_s = --idle``; the series is sent by C-STORE
    (pynetdicom, one association); the figure is the time from the last instance's C-STORE answer to the SEG being
    stored at the destination (polled every 50 ms). ``--dest orthanc`` sends to the Orthanc above; ``--dest
    pynetdicom`` to a C-STORE SCP inside this script (machines without Orthanc: the GPU machine). The idle wait is
    part of the latency by design (DICOM has no end-of-series message); ``latency_minus_idle_s`` is the rest.
    Repeated ``--rounds`` times with new series UIDs.

Writes ``benchmarks/results/<--out>.json`` (default ``pacs``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from _common import save
from inference import ct_volume, make_model_dir


def _medseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "medseg", "-q", *args]


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-3000:]}")
    return seconds


def write_series(folder: Path, shape, study_uid: str | None = None, series_uid: str | None = None) -> list[Path]:
    from medseg.io.dicom_write import write_dicom_series

    return write_dicom_series(ct_volume(tuple(shape), seed=0), folder, study_uid=study_uid, series_uid=series_uid,
                              patient_name="Bench^Mark", patient_id="BENCH")


def bench_dicomweb(server, model: Path, work: Path, shape, rounds: int, device: str) -> dict:
    from pydicom.uid import generate_uid

    study = generate_uid()
    files = write_series(work / "series", shape, study_uid=study)
    server.upload(files)
    url = f"{server.dicomweb}/studies/{study}"
    common = ["-m", str(model), "-t", "dicom-seg", "--device", device, "--no-qc", "--overwrite"]
    runs = {
        "folder": lambda k: _medseg("predict", "-i", str(work / "series"), "-o", str(work / f"f{k}"), *common),
        "dicomweb": lambda k: _medseg("predict", "-i", url, "-o", str(work / f"w{k}"), *common),
        "dicomweb_push": lambda k: _medseg("predict", "-i", url, "-o", str(work / f"p{k}"), "--push", "same", *common),
    }
    _timed(runs["folder"]("warm"))  # file cache, first import
    times = {name: [] for name in runs}
    order = list(runs)
    for k in range(rounds):
        for name in order[k % 3:] + order[: k % 3]:
            times[name].append(_timed(runs[name](k)))
    ratio = lambda name: float(np.median([t / f for t, f in zip(times[name], times["folder"])]))  # noqa: E731
    manifest = json.loads((work / "w0" / "manifest.json").read_text())
    return {
        "series": {"shape": list(shape), "instances": len(files), "mb": round(sum(f.stat().st_size for f in files) / 2**20, 1)},
        "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        "median_s": {name: round(float(np.median(ts)), 3) for name, ts in times.items()},
        "ratio_dicomweb_over_folder": round(ratio("dicomweb"), 3),
        "ratio_dicomweb_push_over_folder": round(ratio("dicomweb_push"), 3),
        "download_s_in_run": manifest["source"]["dicomweb"]["download_s"],
        "goal_ratio": 1.2,
    }


class StoreScp:
    """A C-STORE SCP that notes when each SEG arrives (the destination where there is no Orthanc)."""

    def __init__(self):
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.arrivals: list[float] = []
        ae = AE(ae_title="BENCHDEST")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        if str(event.dataset.get("Modality", "")) == "SEG":
            self.arrivals.append(time.monotonic())
        return 0x0000

    def count(self) -> int:
        return len(self.arrivals)

    def stop(self):
        self.server.shutdown()


def bench_listener(model: Path, work: Path, shape, rounds: int, idle: float, device: str, server=None) -> dict:
    import orthanc
    import pydicom
    from pydicom.uid import generate_uid
    from pynetdicom import AE

    scp = None if server is not None else StoreScp()
    dest = f"{server.aet}@127.0.0.1:{server.dicom_port}" if server is not None else f"BENCHDEST@127.0.0.1:{scp.port}"
    seg_count = (lambda: len(server.instances("SEG"))) if server is not None else scp.count
    port = orthanc.free_port()
    out = work / "listener"
    serve = subprocess.Popen(_medseg("serve", "-m", str(model), "-o", str(out), "--port", str(port), "--dest", dest,
                                     "--pacs", f"idle_s={idle}", "--device", device),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latencies, sends = [], []
    try:
        deadline = time.monotonic() + 180
        while not (out / "manifest.json").is_file():
            if time.monotonic() > deadline or serve.poll() is not None:
                raise RuntimeError("the listener did not start: " + (serve.stdout.read() if serve.poll() is not None else ""))
            time.sleep(0.1)
        for k in range(rounds):
            files = write_series(work / f"l{k}", shape, series_uid=generate_uid())
            datasets = [pydicom.dcmread(f) for f in files]
            before = seg_count()
            ae = AE(ae_title="BENCHSCU")
            ae.add_requested_context(datasets[0].SOPClassUID)
            start = time.monotonic()
            assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEG")
            for ds in datasets:
                assoc.send_c_store(ds)
            last = time.monotonic()
            assoc.release()
            while seg_count() <= before:
                if time.monotonic() - last > 300:
                    raise RuntimeError("no SEG arrived within 300 s")
                time.sleep(0.05)
            arrived = time.monotonic()
            sends.append(last - start)
            latencies.append(arrived - last)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=300)
        if scp is not None:
            scp.stop()
    record = json.loads((out / "manifest.json").read_text())
    timings = [c["timings"] for c in record["cases"] if c["status"] == "ok"]
    return {
        "destination": "orthanc" if server is not None else "pynetdicom",
        "idle_s": idle,
        "send_s": [round(s, 3) for s in sends],
        "latency_s": [round(s, 3) for s in latencies],
        "median_latency_s": round(float(np.median(latencies)), 3),
        "median_latency_minus_idle_s": round(float(np.median(latencies)) - idle, 3),
        "case_timings": timings,
        "delivery_s": [c["delivery"]["seconds"] for c in record["cases"] if c.get("delivery")],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 96])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=1.0)
    parser.add_argument("--dest", choices=["orthanc", "pynetdicom"], default="orthanc")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="pacs")
    args = parser.parse_args()
    import orthanc

    result = {"settings": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model_dir(work / "model")
        server = orthanc.start(work / "orthanc") if args.dest == "orthanc" else None
        try:
            if server is not None:
                result["dicomweb"] = bench_dicomweb(server, model, work / "web", args.shape, args.rounds, args.device)
            result["listener"] = bench_listener(model, work / "listen", args.shape, args.rounds, args.idle,
                                                args.device, server)
        finally:
            if server is not None:
                server.stop()
    save(args.out, result)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
