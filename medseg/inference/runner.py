"""Folder inference: many inputs -> one label file each, ``manifest.json`` and ``provenance.json``.

* Per-case isolation: a failing case is recorded with its error code and the others go on; the run exits
  non-zero when any case failed.
* Crash safety: outputs are written atomically and the manifest is rewritten after every case, so a killed
  run leaves only complete files, each with its SHA-256 in the manifest. ``resume`` skips a case only when
  every recorded output still hashes to its recorded value; anything else (missing, truncated, changed) is
  predicted again.
* Never writes inside the input tree; replaces existing outputs only with ``overwrite`` (or when resuming
  cases this output folder already owns).
* ``shard=(i, n)`` takes every n-th case (sorted by ID) so n workers can split one folder; each writes
  ``manifest.shard-i-of-n.json``.
* Reading the next case and writing the previous one run in background threads, overlapped with prediction.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from medseg import threads
from medseg.errors import InputError, MedsegError, OutputError
from medseg.fsutil import atomic_write, sha256_file, versions
from medseg.inference.discovery import CaseInput, discover, shard
from medseg.inference.outputs import (
    hashes, label_paths, label_volumes_ml, parse_output_type, write_labels, write_preview, write_probabilities,
    write_uncertainty,
)
from medseg.inference.predictor import Prediction, Predictor
from medseg.io.dicom_derived import PYDICOM_ROOT, producer_for
from medseg.io.dicom_geometry import DEFAULT_TOLERANCES, DicomTolerances
from medseg.io.readers import case_id as case_id_of
from medseg.io.readers import read_channels, read_volume
from medseg.io.volume import Volume

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass
class RunOptions:
    """How a folder run behaves (the ``medseg predict`` flags)."""

    overwrite: bool = False
    resume: bool = False
    shard: tuple[int, int] = (0, 1)
    output_type: str = "nifti"
    save_probabilities: bool = False
    stats: bool = False
    preview: bool = False
    progress: bool = True
    allow_tilt: bool = False
    dicom: DicomTolerances = DEFAULT_TOLERANCES  # when a slice stack is one volume
    save_uncertainty: bool = False  # uncertainty/<case>.nii.gz: normalised entropy on the input grid
    qc: bool | None = None  # QC verdict per case (None: the model's inference.qc.enabled)
    uid_root: str = PYDICOM_ROOT  # new DICOM-SEG / RTSTRUCT UIDs under this prefix (pacs.uid_root)


@dataclass
class CaseResult:
    """One row of the manifest."""

    case_id: str
    input: str
    status: str  # "ok" | "failed" | "skipped"
    output: str | None = None
    sha256: str | None = None
    error_code: str | None = None
    error: str | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    volumes_ml: dict[str, float] | None = None
    series_instance_uid: str | None = None
    slice_geometry: dict | None = None  # DICOM stacks: measured in-plane drift and step spread (tolerated)
    resumed: bool = False
    notes: list[str] = field(default_factory=list)
    qc: dict | None = None  # verdict ("ok" | "review"), score, reasons, signals (medseg.qc)
    delivery: dict | None = None  # results sent on (STOW-RS --push, the listener's C-STORE): status, code, seconds


@dataclass
class WriteOutcome:
    """What the writer thread measured for one case; the main thread merges it into the case's result (results
    and the manifest built from them are only ever touched by the main thread)."""

    status: str
    seconds: float
    error_code: str | None = None
    error: str | None = None
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    write_s: float | None = None

    def merge_into(self, result: CaseResult) -> None:
        result.status, result.seconds = self.status, self.seconds
        if self.status == "ok":
            result.outputs = self.outputs
            result.output, result.sha256 = Path(self.outputs["labels"]["file"]).name, self.outputs["labels"]["sha256"]
            result.timings["write_s"] = self.write_s
        else:
            result.error_code, result.error = self.error_code, self.error


def read_manifests(out_dir: Path) -> tuple[list[dict], list[str]]:
    """Every case entry of a prediction folder's manifests (``manifest.json`` and shard manifests) and the model
    folder names they record.

    Raises:
        InputError: ``PREDICTION_DIR_INVALID`` when a manifest cannot be read.
    """
    cases, models = [], []
    for path in sorted(Path(out_dir).glob("manifest*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            cases += record["cases"]
            models = models or record.get("model", [])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError("PREDICTION_DIR_INVALID", f"{path.name} in {Path(out_dir).name} is unreadable: {exc}",
                             "run `medseg predict` again into this folder (--resume keeps complete cases)") from None
    return cases, models


def manifest_name(options: RunOptions) -> str:
    index, count = options.shard
    return MANIFEST if count == 1 else f"manifest.shard-{index}-of-{count}.json"


def check_output_location(inputs_root: Path, out_dir: Path) -> None:
    """Refuses an output folder inside an input folder, or the folder of an input file itself.

    A folder of cases (or a DICOM series folder) is read recursively, so no output may land anywhere in it. For one
    input file, a folder beside it (``scan.nii.gz`` and ``pred/``) is fine; its own folder is not (the output,
    named after the case, could replace the input).

    Raises:
        OutputError: ``OUTPUT_INSIDE_INPUT``.
    """
    out = out_dir.resolve()
    if inputs_root.is_dir():
        root = inputs_root.resolve()
        if out == root or root in out.parents:
            raise OutputError(
                "OUTPUT_INSIDE_INPUT", f"output folder {out_dir} lies inside the input folder {root}", "choose another -o"
            )
    elif out == inputs_root.resolve().parent:
        raise OutputError(
            "OUTPUT_INSIDE_INPUT", f"output folder {out_dir} is the folder of the input file {inputs_root.name}",
            "choose another -o, e.g. a new folder beside the input",
        )


def predict_folder(predictor: Predictor, inputs: Path, out_dir: Path, overwrite: bool = False,
                   options: RunOptions | None = None) -> list[CaseResult]:
    """Predicts a file, a DICOM series folder or a folder of cases (see :mod:`medseg.inference.discovery`).

    Raises:
        InputError: ``PATH_NOT_FOUND`` / ``NO_INPUTS`` / ``SHARD_INVALID``.
        OutputError: ``OUTPUT_INSIDE_INPUT``.
    """
    options = options or RunOptions(overwrite=overwrite)
    parse_output_type(options.output_type)
    found = discover(inputs)
    check_output_location(Path(inputs), out_dir)
    cases = shard(found.cases, *options.shard)
    return run_cases(predictor, cases, out_dir, options, ignored=found.ignored)


def predict_files(predictor: Predictor, files: list[Path | tuple[Path, ...]], out_dir: Path, overwrite: bool = False,
                  options: RunOptions | None = None) -> list[CaseResult]:
    """Predicts the given images (a path, or a tuple of channel files per case); see :func:`run_cases`."""
    cases = [CaseInput(case_id_of(f if isinstance(f, Path) else f[0]), f) for f in files]  # recorded by file name
    return run_cases(predictor, cases, out_dir, options or RunOptions(overwrite=overwrite))


def _previous(out_dir: Path, options: RunOptions) -> dict[str, dict]:
    path = out_dir / manifest_name(options)
    if not (options.resume and path.is_file()):
        return {}
    try:
        return {c["case_id"]: c for c in json.loads(path.read_text())["cases"]}
    except (json.JSONDecodeError, KeyError, TypeError):
        log.warning("%s is unreadable; predicting every case again", path.name)
        return {}


def _complete(entry: dict | None, out_dir: Path) -> bool:
    """True when a previous run finished this case and every output still has its recorded hash."""
    if not entry or entry.get("status") != "ok" or not entry.get("outputs"):
        return False
    for record in entry["outputs"].values():
        path = out_dir / record["file"]
        if not path.is_file() or sha256_file(path) != record["sha256"]:
            return False
    return True


def _load(case: CaseInput, options: RunOptions) -> tuple[Volume, float]:
    start = time.perf_counter()
    if case.series is not None:
        from medseg.io.dicom import load_series

        volume = load_series(case.series, tolerances=options.dicom, allow_tilt=options.allow_tilt)
    elif isinstance(case.source, tuple):
        volume = read_channels(case.source)
    else:
        volume = read_volume(case.source)
    return volume, time.perf_counter() - start


def run_cases(predictor: Predictor, cases: list[CaseInput], out_dir: Path, options: RunOptions,
              ignored: dict[str, int] | None = None, *, prior: list[CaseResult] | None = None,
              extra: dict | None = None) -> list[CaseResult]:
    """Predicts ``cases`` into ``out_dir``; writes the manifest after each case and ``provenance.json``.

    Args:
        prior: Results of earlier calls kept at the head of the manifest (the listener's cumulative manifest).
        extra: More top-level manifest entries (``source`` of a DICOMweb study, the listener's ``events``).

    Returns:
        One :class:`CaseResult` per case, in order (``prior`` first).
    """
    from medseg.progress import progress_bar

    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    previous = _previous(out_dir, options)
    results: list[CaseResult] = list(prior or [])
    todo: list[tuple[CaseInput, CaseResult]] = []
    for case in cases:
        result = CaseResult(case.case_id, case.recorded or case.path.name, case.status,
                            error_code=case.error_code, error=case.error)
        results.append(result)
        if case.status != "pending":
            continue
        if _complete(previous.get(case.case_id), out_dir):
            results[-1] = CaseResult(**{**previous[case.case_id], "resumed": True})
            continue
        todo.append((case, result))

    def save_manifest() -> None:
        write_manifest(out_dir, options, predictor, results, ignored or {}, extra)

    pending_writes: list[tuple[Future, CaseResult]] = []

    def merge_writes(wait: bool) -> None:
        for future, result in [w for w in pending_writes if wait or w[0].done()]:
            pending_writes.remove((future, result))
            future.result().merge_into(result)

    with progress_bar(options.progress) as progress, ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        case_task = progress.add_task("cases", total=len(todo))
        window_task = progress.add_task("windows", total=1)

        def on_window(done: int, total: int) -> None:
            progress.update(window_task, completed=done, total=total)

        next_read = reader.submit(_load, todo[0][0], options) if todo else None
        for i, (case, result) in enumerate(todo):
            threads.refresh()  # take the current CPU share (other medseg processes start and end)
            read, next_read = next_read, (reader.submit(_load, todo[i + 1][0], options) if i + 1 < len(todo) else None)
            start = time.perf_counter()
            try:
                volume, read_s = read.result()
                result.timings["read_s"] = round(read_s, 3)
                if case.series is not None:
                    result.series_instance_uid = volume.meta.get("series_instance_uid")
                    result.slice_geometry = volume.meta.get("slice_geometry")
                targets = label_paths(out_dir, case.case_id, case.path, case.is_dicom, options.output_type)
                for target in targets.values():
                    if target.exists() and not (options.overwrite or case.case_id in previous):
                        raise OutputError("OUTPUT_EXISTS", f"{target.name} exists", "pass --overwrite to replace it (or --resume)")
                if options.output_type != "nifti" and not case.is_dicom:
                    kinds = " and ".join({"dicom-seg": "DICOM-SEG", "rtstruct": "RTSTRUCT"}[f]
                                         for f in parse_output_type(options.output_type))
                    result.notes.append(f"{kinds} needs a DICOM input: wrote NIfTI")
                t = time.perf_counter()
                prediction = predictor.predict_case(volume, probabilities=options.save_probabilities, on_window=on_window,
                                                    qc=options.qc, uncertainty=options.save_uncertainty)
                result.timings["predict_s"] = round(time.perf_counter() - t, 3)
                result.qc = prediction.qc
                if prediction.qc and prediction.qc["verdict"] == "review":
                    log.warning("case %s: review (%s)", case.case_id, "; ".join(r["text"] for r in prediction.qc["reasons"]))
                if "postprocess" in prediction.stats:
                    result.notes.append(f"post-processing: {prediction.stats['postprocess']}")
                if options.stats:
                    result.volumes_ml = label_volumes_ml(prediction.labels, predictor.labels)
                pending_writes.append((writer.submit(_write_case, predictor, volume, prediction, targets, case.case_id,
                                                     options, start), result))
            except MedsegError as exc:
                result.status, result.error_code, result.error = "failed", exc.code, exc.one_line()
            except Exception as exc:  # noqa: BLE001 - per-case isolation: record and carry on
                result.status, result.error_code, result.error = "failed", "INTERNAL_ERROR", f"{type(exc).__name__}: {exc}"
                log.debug("case %s failed:\n%s", case.case_id, traceback.format_exc())
            if result.status == "failed":
                result.seconds = round(time.perf_counter() - start, 3)
                log.error("case %s failed: %s", case.case_id, result.error)
            merge_writes(wait=False)
            save_manifest()
            progress.update(case_task, advance=1)
        merge_writes(wait=True)
    save_manifest()
    _write_provenance(out_dir, predictor, results, options, started)
    return results


def _write_case(predictor: Predictor, volume: Volume, prediction: Prediction, targets: dict[str, Path], case: str,
                options: RunOptions, start: float) -> WriteOutcome:
    """Writes one case's outputs (background thread) and returns what happened; it never touches a result."""
    try:
        t = time.perf_counter()
        producer = producer_for(predictor, options.uid_root)
        for target in targets.values():
            write_labels(prediction.labels, target, volume, predictor.labels, producer)
        written = dict(targets)
        target = targets["labels"]
        if prediction.probabilities is not None:
            written["probabilities"] = target.parent / "probabilities" / f"{case}.npz"
            write_probabilities(prediction.probabilities, written["probabilities"], predictor.labels)
        if prediction.uncertainty is not None:
            written["uncertainty"] = target.parent / "uncertainty" / f"{case}.nii.gz"
            write_uncertainty(prediction.uncertainty, written["uncertainty"])
        if options.preview:
            written["preview"] = target.parent / "previews" / f"{case}.png"
            write_preview(volume, prediction.labels, written["preview"], predictor.labels, prediction.uncertainty)
        outputs = hashes(written, target.parent)
        return WriteOutcome("ok", round(time.perf_counter() - start, 3), outputs=outputs,
                            write_s=round(time.perf_counter() - t, 3))
    except MedsegError as exc:
        code, error = exc.code, exc.one_line()
    except Exception as exc:  # noqa: BLE001
        code, error = "INTERNAL_ERROR", f"{type(exc).__name__}: {exc}"
    log.error("case %s failed while writing: %s", case, error)
    return WriteOutcome("failed", round(time.perf_counter() - start, 3), code, error)


def write_manifest(out_dir: Path, options: RunOptions, predictor: Predictor, results: list[CaseResult],
                    ignored: dict[str, int], extra: dict | None = None) -> None:
    manifest = {
        "model": [m.model_dir.resolve().name for m in predictor.members],  # folder names only
        "shard": list(options.shard),
        "n_ok": sum(r.status == "ok" for r in results),
        "n_failed": sum(r.status == "failed" for r in results),
        "n_skipped": sum(r.status == "skipped" for r in results),
        "n_pending": sum(r.status == "pending" for r in results),
        "n_review": sum(bool(r.qc) and r.qc["verdict"] == "review" for r in results),
        "n_delivery_failed": sum(bool(r.delivery) and r.delivery["status"] == "failed" for r in results),
        "ignored_files": ignored,
        **(extra or {}),
        "cases": [asdict(r) for r in results],
    }
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(out_dir / manifest_name(options), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    if options.stats:
        rows = ["case_id," + ",".join(f"{name}_ml" for k, name in sorted(predictor.labels.items()) if k) + ",qc,qc_score,qc_reasons"]
        for r in results:
            if r.volumes_ml is not None and r.status == "ok":
                qc = r.qc or {}
                reasons = " | ".join(x["code"] + (f" {x['label']}" if x["label"] else "") for x in qc.get("reasons", []))
                rows.append(r.case_id + "," + ",".join(str(v) for v in r.volumes_ml.values())
                            + f",{qc.get('verdict', '')},{qc.get('score', '')},{reasons}")
        stats_name = "stats.csv" if options.shard[1] == 1 else f"stats.shard-{options.shard[0]}-of-{options.shard[1]}.csv"
        atomic_write(out_dir / stats_name, lambda tmp: tmp.write_text("\n".join(rows) + "\n", encoding="utf-8"))


def _write_provenance(out_dir: Path, predictor: Predictor, results: list[CaseResult], options: RunOptions,
                      started: str) -> None:
    provenance = {
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "models": [
            {"dir": m.model_dir.resolve().name, "weights_sha256": m.info.get("weights_sha256"), "network_sha256": m.info.get("network_sha256"),
             "config_hash": m.info.get("config_hash"), "format": m.info.get("format", "pytorch")}
            for m in predictor.members
        ],
        "settings": {
            "device": str(predictor.device), "tta": predictor.tta, "overlap": predictor.overlap,
            "sw_batch_size": predictor.sw_batch_size, "blend": predictor.cfg.inference.blend,
            "postprocess": predictor.cfg.inference.postprocess.model_dump(), **{
                k: v for k, v in asdict(options).items() if k not in ("progress",)},
        },
        "cases": [
            {"case_id": r.case_id, "status": r.status, "series_instance_uid": r.series_instance_uid, "timings": r.timings}
            for r in results
        ],
    }
    name = "provenance.json" if options.shard[1] == 1 else f"provenance.shard-{options.shard[0]}-of-{options.shard[1]}.json"
    text = json.dumps(provenance, indent=2, default=str) + "\n"
    atomic_write(out_dir / name, lambda tmp: tmp.write_text(text, encoding="utf-8"))
