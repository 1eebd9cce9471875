"""Folder inference: many inputs -> one label file each, ``manifest.json`` and ``provenance.json``.

* Per-case isolation: a failing case is recorded with its error code and the others go on; the run exits
  non-zero when any case failed. Every message recorded or shown names files relative to the input folder (folder
  names are often patient names; :func:`medseg.errors.scrub_paths`).
* Before any work: the output folder is probed for writing (``OUTPUT_IS_FILE``, ``OUTPUT_NOT_WRITABLE``,
  ``DISK_FULL``); a folder holding a finished run's manifest is refused without ``overwrite`` or ``resume``
  (``OUTPUT_EXISTS``: its record is never rewritten by accident); temporary files of writers that were killed are
  removed.
* Crash safety: outputs are written atomically and the manifest is rewritten after every case, so a killed
  run leaves only complete files, each with its SHA-256 in the manifest. ``resume`` skips a case only when
  every recorded output still hashes to its recorded value; anything else (missing, truncated, changed) is
  predicted again. A manifest that cannot be read is kept aside and rebuilt from the outputs on disk, each read
  back in full before it counts as complete.
* A full disk stops the run: the case that could not be written is recorded ``DISK_FULL``, the ones not reached
  ``pending``, and the manifest is written into space reserved for it at the start (:class:`DiskReserve`).
* SIGINT/SIGTERM (:class:`medseg.errors.Interrupted`): the write in flight finishes, the case being predicted and
  the rest stay ``pending``, the manifest is written, and the interruption goes on to the caller.
* Never writes inside the input tree; replaces existing outputs only with ``overwrite`` (or when resuming
  cases this output folder already owns).
* ``shard=(i, n)`` takes every n-th case (sorted by ID) so n workers can split one folder; each writes
  ``manifest.shard-i-of-n.json``.
* Reading the next case and writing the previous one run in background threads, overlapped with prediction.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from medseg import threads
from medseg.errors import InputError, MedsegError, OutputError, describe, from_os_error, scrub_paths, unwrap
from medseg.fsutil import (
    DiskReserve,
    atomic_write,
    check_output_dir,
    remove_stale_partials,
    sha256_file,
    versions,
    write_json,
)
from medseg.inference.discovery import CaseInput, discover, shard
from medseg.inference.formats import OutputFormat, label_paths, parse_output_type
from medseg.inference.manifest import (  # noqa: F401 - CaseResult and read_manifests are part of this module's API
    MANIFEST,
    CaseResult,
    case_from_record,
    read_manifest,
    read_manifests,
)
from medseg.inference.manifest import (
    manifest_name as _shard_manifest,
)
from medseg.inference.outputs import (
    hashes,
    label_volumes_ml,
    producer_for,
    verify_output,
    write_preview,
    write_probabilities,
    write_saliency,
    write_uncertainty,
)
from medseg.inference.predictor import Prediction, Predictor
from medseg.inference.viewer_file import write_case_viewer
from medseg.io.dicom_derived import PYDICOM_ROOT
from medseg.io.dicom_geometry import DicomTolerances, default_tolerances
from medseg.io.readers import case_id as case_id_of
from medseg.io.readers import read_channels, read_volume
from medseg.io.volume import Volume

log = logging.getLogger(__name__)


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
    dicom: DicomTolerances = field(default_factory=default_tolerances)  # when a slice stack is one volume
    save_uncertainty: bool = False  # uncertainty/<case>.nii.gz: normalised entropy on the input grid
    qc: bool | None = None  # QC verdict per case (None: the model's inference.qc.enabled)
    uid_root: str = PYDICOM_ROOT  # new DICOM-SEG / RTSTRUCT UIDs under this prefix (pacs.uid_root)
    explain: bool = False  # saliency/<case>.nii.gz: Grad-CAM per foreground label (medseg.inference.explain)


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
            result.timings["write_s"] = self.write_s or 0.0
        else:
            result.error_code, result.error = self.error_code, self.error


def manifest_name(options: RunOptions) -> str:
    return _shard_manifest(options.shard)


def failure(exc: BaseException, roots: Sequence[Path] = ()) -> tuple[str, str]:
    """``(code, one-line message)`` of a case's failure, for the manifest and the console: medseg's own errors as
    they are, an allocation failure as ``OUT_OF_MEMORY``, a file system refusal by its code, anything else
    ``INTERNAL_ERROR``; every text scrubbed of folder names (paths under ``roots`` shown relative to them)."""
    exc = unwrap(exc)
    if isinstance(exc, MedsegError):
        return exc.code, exc.one_line(roots)
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and _allocation_failed(exc)):
        error = MedsegError("OUT_OF_MEMORY", "the machine ran out of memory for this case",
                            "free memory (fewer processes, --threads 1), or use a smaller --overlap or no TTA")
        return error.code, error.one_line()
    if isinstance(exc, OSError):
        error = from_os_error(exc)
        return error.code, error.one_line(roots)
    return "INTERNAL_ERROR", describe(exc, roots=roots)


def _allocation_failed(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("can't allocate memory", "not enough memory", "out of memory", "bad_alloc"))


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


def prepare_output(out_dir: Path, options: RunOptions) -> None:
    """The checks before any case is read: the output folder can be written (a probe file is written, synced and
    removed), it holds no finished run's manifest unless ``overwrite``/``resume`` say what to do with it, and
    temporary files of killed writers are removed.

    Raises:
        OutputError: ``OUTPUT_IS_FILE``, ``OUTPUT_NOT_WRITABLE``, ``DISK_FULL``, ``OUTPUT_EXISTS``.
    """
    check_output_dir(out_dir)
    manifest = out_dir / manifest_name(options)
    if (manifest.exists() or manifest.is_symlink()) and not (options.overwrite or options.resume):
        raise OutputError(
            "OUTPUT_EXISTS", f"the output folder {out_dir.name} holds a prediction run ({manifest.name})",
            "--resume completes it (complete cases are kept), --overwrite predicts every case again, "
            "or choose another -o",
        )
    removed = remove_stale_partials(out_dir)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)


def predict_folder(predictor: Predictor, inputs: Path, out_dir: Path, overwrite: bool = False,
                   options: RunOptions | None = None) -> list[CaseResult]:
    """Predicts a file, a DICOM series folder or a folder of cases (see :mod:`medseg.inference.discovery`).

    Raises:
        InputError: ``PATH_NOT_FOUND`` / ``NO_INPUTS`` / ``SHARD_INVALID``.
        OutputError: ``OUTPUT_INSIDE_INPUT`` and those of :func:`prepare_output`; ``DISK_FULL`` when the disk
            fills during the run (the manifest records what was complete).
    """
    options = options or RunOptions(overwrite=overwrite)
    parse_output_type(options.output_type)
    inputs = Path(inputs)
    found = discover(inputs)
    check_output_location(inputs, out_dir)
    cases = shard(found.cases, *options.shard)
    root = inputs if inputs.is_dir() else inputs.parent
    return run_cases(predictor, cases, out_dir, options, ignored=found.ignored, roots=[root])


def predict_files(predictor: Predictor, files: list[Path | tuple[Path, ...]], out_dir: Path, overwrite: bool = False,
                  options: RunOptions | None = None) -> list[CaseResult]:
    """Predicts the given images (a path, or a tuple of channel files per case); see :func:`run_cases`."""
    cases = [CaseInput(case_id_of(f if isinstance(f, Path) else f[0]), f) for f in files]  # recorded by file name
    roots = sorted({c.path.parent for c in cases})
    return run_cases(predictor, cases, out_dir, options or RunOptions(overwrite=overwrite), roots=roots)


def _previous(out_dir: Path, options: RunOptions) -> tuple[dict[str, dict], bool]:
    """``({case ID: manifest entry}, rebuild)`` of the run being resumed. An unreadable manifest is kept aside
    (``manifest.json.unreadable-<time>``) and ``rebuild`` is True: the outputs on disk are checked instead."""
    path = out_dir / manifest_name(options)
    if not options.resume or not (path.exists() or path.is_symlink()):
        return {}, False
    try:
        return {c["case_id"]: c for c in read_manifest(path)["cases"]}, False
    except InputError as exc:
        aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        log.warning("%s; kept as %s, and the complete outputs are found by reading them back", exc.message, aside.name)
        return {}, True


def _complete(entry: dict | None, out_dir: Path) -> bool:
    """True when a previous run finished this case and every output still has its recorded hash."""
    if not entry or entry.get("status") != "ok" or not entry.get("outputs"):
        return False
    for record in entry["outputs"].values():
        path = out_dir / record["file"]
        if not path.is_file() or sha256_file(path) != record["sha256"]:
            return False
    return True


def _rebuilt(case: CaseInput, out_dir: Path, options: RunOptions) -> CaseResult | None:
    """The record of a case whose outputs (all that ``options`` ask for) are on disk and read back in full, when
    the manifest that recorded them was lost; else None (the case is predicted again)."""
    targets = {kind: path for kind, (path, _) in
               label_paths(out_dir, case.case_id, case.path, case.is_dicom, options.output_type).items()}
    extra = {"probabilities": (options.save_probabilities, f"probabilities/{case.case_id}.npz"),
             "uncertainty": (options.save_uncertainty, f"uncertainty/{case.case_id}.nii.gz"),
             "saliency": (options.explain, f"saliency/{case.case_id}.nii.gz"),
             "preview": (options.preview, f"previews/{case.case_id}.png"),
             # the reports' viewer file: 3D cases only (written before the preview), so the one there is checked
             "viewer": (options.preview and (out_dir / f"previews/{case.case_id}.viewer.npz").is_file(),
                        f"previews/{case.case_id}.viewer.npz")}
    targets.update({kind: out_dir / name for kind, (wanted, name) in extra.items() if wanted})
    if not all(verify_output(path) for path in targets.values()):
        return None
    outputs = hashes(targets, out_dir)
    return CaseResult(case.case_id, case.recorded or case.path.name, "ok", output=targets["labels"].name,
                      sha256=outputs["labels"]["sha256"], outputs=outputs, resumed=True,
                      notes=["manifest rebuilt: the outputs were read back in full (QC and volumes not recorded)"])


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


def _reserve_size(n_cases: int) -> int:
    """Space kept for the manifest: 256 KiB plus 8 KiB a case (a case's record with QC is 2-4 KiB), at most 32 MiB."""
    return min(32 << 20, (256 << 10) + (8 << 10) * n_cases)


def _sort_cases(cases: list[CaseInput], out_dir: Path, options: RunOptions, previous: dict[str, dict], rebuild: bool,
                roots: Sequence[Path], prior: list[CaseResult] | None) -> tuple[list[CaseResult], list[tuple[CaseInput, CaseResult]]]:
    """Every case's record (``prior`` first; cases refused before reading, complete ones of an earlier run kept or
    rebuilt) and the cases left to predict, each with its record."""
    results: list[CaseResult] = list(prior or [])
    todo: list[tuple[CaseInput, CaseResult]] = []
    for case in cases:
        result = CaseResult(case.case_id, case.recorded or case.path.name, case.status,
                            error_code=case.error_code, error=scrub_paths(case.error, roots) if case.error else None)
        results.append(result)
        if case.status != "pending":
            continue
        done = _rebuilt(case, out_dir, options) if rebuild else None
        if done is not None or _complete(previous.get(case.case_id), out_dir):
            results[-1] = done or CaseResult(**{**case_from_record(previous[case.case_id]).__dict__, "resumed": True})
            continue
        todo.append((case, result))
    return results, todo


def _start_case(predictor: Predictor, case: CaseInput, result: CaseResult, read: Future, out_dir: Path,
                options: RunOptions, owned: bool, on_window, writer: ThreadPoolExecutor,
                roots: Sequence[Path]) -> tuple[Future | None, MedsegError | None]:
    """Predicts one case and hands its outputs to ``writer``: ``(the write, None)``. A failure is recorded in
    ``result`` (per-case isolation) and gives ``(None, None)``, or ``(None, DISK_FULL error)``, which stops the run."""
    start = time.perf_counter()
    try:
        volume, prediction, targets = _predict_case(predictor, case, result, read, out_dir, options, owned, on_window)
        return writer.submit(_write_case, predictor, volume, prediction, targets, case.case_id, options, start), None
    except Exception as exc:  # noqa: BLE001 - per-case isolation (MemoryError included): record and carry on
        result.status, (result.error_code, result.error) = "failed", failure(exc, roots)
        if result.error_code == "INTERNAL_ERROR":
            log.debug("case %s failed:\n%s", case.case_id, traceback.format_exc())
        result.seconds = round(time.perf_counter() - start, 3)
        log.error("case %s failed: %s", case.case_id, result.error)
        if result.error_code == "DISK_FULL":
            return None, OutputError(result.error_code, result.error.split(": ", 1)[-1])
        return None, None


def run_cases(predictor: Predictor, cases: list[CaseInput], out_dir: Path, options: RunOptions,
              ignored: dict[str, int] | None = None, *, prior: list[CaseResult] | None = None,
              extra: dict | None = None, roots: Sequence[Path] = ()) -> list[CaseResult]:
    """Predicts ``cases`` into ``out_dir``; writes the manifest after each case and ``provenance.json``.

    Args:
        prior: Results of earlier calls kept at the head of the manifest (the listener's cumulative manifest).
        extra: More top-level manifest entries (``source`` of a DICOMweb study, the listener's ``events``).
        roots: The input folders: messages name files relative to them.

    Returns:
        One :class:`CaseResult` per case, in order (``prior`` first).

    Raises:
        OutputError: see :func:`prepare_output`; ``DISK_FULL`` when the disk fills (the manifest records the
            complete cases, the failed one and the ``pending`` rest).
        Interrupted: SIGINT/SIGTERM, after the manifest was written.
    """
    from medseg.progress import progress_bar

    prepare_output(out_dir, options)
    roots = [*roots, out_dir]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    previous, rebuild = _previous(out_dir, options)
    results, todo = _sort_cases(cases, out_dir, options, previous, rebuild, roots, prior)
    this_run = {c.case_id for c in cases}
    kept = [case_from_record(e) for cid, e in previous.items() if cid not in this_run]  # other cases of the run
    reserve = DiskReserve(out_dir, _reserve_size(len(results) + len(kept)))

    def save_manifest() -> None:
        reserve.retry(lambda: write_manifest(out_dir, options, predictor, results + kept, ignored or {}, extra))

    pending_writes: list[tuple[Future, CaseResult]] = []
    stop: MedsegError | None = None

    def merge_writes(wait: bool) -> None:
        nonlocal stop
        for future, result in [w for w in pending_writes if wait or w[0].done()]:
            pending_writes.remove((future, result))
            future.result().merge_into(result)
            if result.error_code == "DISK_FULL" and stop is None:
                stop = OutputError("DISK_FULL", f"the disk holding {out_dir.name} is full: stopped after "
                                   f"{sum(r.status == 'ok' for r in results)} complete case(s)",
                                   "free space, then run the same command with --resume: complete cases are kept")

    try:
        with progress_bar(options.progress) as progress, ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
            case_task = progress.add_task("cases", total=len(todo))
            window_task = progress.add_task("windows", total=1)

            def on_window(done: int, total: int) -> None:
                progress.update(window_task, completed=done, total=total)

            try:
                next_read = reader.submit(_load, todo[0][0], options) if todo else None
                for i, (case, result) in enumerate(todo):
                    if stop is not None:
                        break
                    threads.refresh()  # take the current CPU share (other medseg processes start and end)
                    read = next_read
                    next_read = reader.submit(_load, todo[i + 1][0], options) if i + 1 < len(todo) else None
                    assert read is not None  # submitted for every case in todo
                    write, stop = _start_case(predictor, case, result, read, out_dir, options,
                                              rebuild or case.case_id in previous, on_window, writer, roots)
                    if write is not None:
                        pending_writes.append((write, result))
                    merge_writes(wait=False)
                    if stop is None:
                        save_manifest()
                    progress.update(case_task, advance=1)
                merge_writes(wait=True)
            except KeyboardInterrupt:
                reader.shutdown(wait=False, cancel_futures=True)
                merge_writes(wait=True)  # the write in flight finishes: its case is complete and recorded
                raise
            finally:
                save_manifest()
        if stop is not None:
            raise stop
        _write_provenance(out_dir, predictor, results, options, started)
    finally:
        reserve.release()
    return results


def _predict_case(predictor: Predictor, case: CaseInput, result: CaseResult, read: Future, out_dir: Path,
                  options: RunOptions, owned: bool, on_window) -> tuple[Volume, Prediction, dict[str, tuple[Path, OutputFormat]]]:
    """Takes one case's read (a future), checks where its outputs go (``owned``: this folder's run wrote them, so
    they may be replaced) and predicts it, recording timings, QC and notes in ``result``; returns what the writer
    needs: ``(volume, prediction, output paths)``."""
    volume, read_s = read.result()
    result.timings["read_s"] = round(read_s, 3)
    result.notes.extend(volume.meta.get("notes", []))
    if case.series is not None:
        result.series_instance_uid = volume.meta.get("series_instance_uid")
        result.slice_geometry = volume.meta.get("slice_geometry")
    targets = label_paths(out_dir, case.case_id, case.path, case.is_dicom, options.output_type)
    for target, _ in targets.values():
        if target.exists() and not (options.overwrite or owned):
            raise OutputError("OUTPUT_EXISTS", f"{target.name} exists", "pass --overwrite to replace it (or --resume)")
    needs_dicom = [f.title for f in parse_output_type(options.output_type) if f.dicom_input]
    if needs_dicom and not case.is_dicom:
        result.notes.append(f"{' and '.join(needs_dicom)} needs a DICOM input: wrote {targets['labels'][1].title}")
    t = time.perf_counter()
    prediction = predictor.predict_case(volume, probabilities=options.save_probabilities, on_window=on_window,
                                        qc=options.qc, uncertainty=options.save_uncertainty)
    result.timings["predict_s"] = round(time.perf_counter() - t, 3)
    if "nnunet" in prediction.stats:  # where an nnU-Net model's time went (medseg.inference.nnunet_exact)
        parts = prediction.stats["nnunet"].get("combined") or [prediction.stats["nnunet"]]  # --combine: summed
        result.timings.update({f"nnunet_{k}_s": round(sum(p[k] for p in parts), 3)
                               for k in ("preprocess", "resample", "network", "resample_back")})
    if options.explain:
        _explain(predictor, volume, prediction, result)
    result.qc = prediction.qc
    if prediction.qc and prediction.qc["verdict"] == "review":
        log.warning("case %s: review (%s)", case.case_id, "; ".join(r["text"] for r in prediction.qc["reasons"]))
    if "postprocess" in prediction.stats:
        result.notes.append(f"post-processing: {prediction.stats['postprocess']}")
    if options.stats:
        result.volumes_ml = label_volumes_ml(prediction.labels, predictor.labels)
    return volume, prediction, targets


def _explain(predictor: Predictor, volume: Volume, prediction: Prediction, result: CaseResult) -> None:
    """``--explain``: the case's Grad-CAM maps into ``prediction.saliency`` (a case of other dimensions than the
    model, a 3D volume through a 2D model, is noted and left without)."""
    if len(volume.spatial_shape) != predictor.spatial_dims:
        result.notes.append(f"no explanation: a {predictor.spatial_dims}D model over a {len(volume.spatial_shape)}D image")
        return
    t = time.perf_counter()
    explanation = predictor.explainer().explain(volume)
    prediction.saliency = explanation.maps
    result.timings["explain_s"] = round(time.perf_counter() - t, 3)
    if explanation.facts["empty"]:
        result.notes.append(f"explanation: empty for {', '.join(explanation.facts['empty'])} (not predicted)")


def _write_case(predictor: Predictor, volume: Volume, prediction: Prediction,
                targets: dict[str, tuple[Path, OutputFormat]], case: str,
                options: RunOptions, start: float) -> WriteOutcome:
    """Writes one case's outputs (background thread) and returns what happened; it never touches a result."""
    try:
        t = time.perf_counter()
        producer = producer_for(predictor, options.uid_root)
        for path, fmt in targets.values():
            fmt.write(prediction.labels, path, volume, predictor.labels, producer)
        written = {kind: path for kind, (path, _) in targets.items()}
        target = written["labels"]
        if prediction.probabilities is not None:
            written["probabilities"] = target.parent / "probabilities" / f"{case}.npz"
            write_probabilities(prediction.probabilities, written["probabilities"], predictor.labels)
        if prediction.uncertainty is not None:
            written["uncertainty"] = target.parent / "uncertainty" / f"{case}.nii.gz"
            write_uncertainty(prediction.uncertainty, written["uncertainty"])
        if prediction.saliency is not None:
            written["saliency"] = target.parent / "saliency" / f"{case}.nii.gz"
            write_saliency(prediction.saliency, written["saliency"])
        if options.preview:
            # the reports' viewer file first: a case whose preview PNG is there has it (3D; 2D pictures, often RGB,
            # are shown whole by their preview)
            if len(volume.spatial_shape) == 3:
                written["viewer"] = target.parent / "previews" / f"{case}.viewer.npz"
                write_case_viewer(volume, prediction.labels, prediction.uncertainty, predictor.labels, written["viewer"])
            written["preview"] = target.parent / "previews" / f"{case}.png"
            write_preview(volume, prediction.labels, written["preview"], predictor.labels, prediction.uncertainty,
                          prediction.saliency)
        outputs = hashes(written, target.parent)
        return WriteOutcome("ok", round(time.perf_counter() - start, 3), outputs=outputs,
                            write_s=round(time.perf_counter() - t, 3))
    except Exception as exc:  # noqa: BLE001 - recorded by the main thread
        code, error = failure(exc, [targets["labels"][0].parent])
    log.error("case %s failed while writing: %s", case, error)
    return WriteOutcome("failed", round(time.perf_counter() - start, 3), code, error)


def write_manifest(out_dir: Path, options: RunOptions, predictor: Predictor, results: list[CaseResult],
                    ignored: dict[str, int], extra: dict | None = None) -> None:
    manifest = {
        "format_version": 2,
        "model": [m.model_dir.resolve().name for m in predictor.members],  # folder names only
        "shard": list(options.shard),
        "n_ok": sum(r.status == "ok" for r in results),
        "n_failed": sum(r.status == "failed" for r in results),
        "n_skipped": sum(r.status == "skipped" for r in results),
        "n_pending": sum(r.status == "pending" for r in results),
        "n_review": sum(r.qc is not None and r.qc["verdict"] == "review" for r in results),
        "n_delivery_failed": sum(r.delivery is not None and r.delivery["status"] == "failed" for r in results),
        "ignored_files": ignored,
        **(extra or {}),
        "cases": [asdict(r) for r in results],
    }
    write_json(out_dir / manifest_name(options), manifest)
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
    from medseg.models.nnunet import origin_label

    provenance = {
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "models": [
            {"dir": m.model_dir.resolve().name, "weights_sha256": m.info.get("weights_sha256"), "network_sha256": m.info.get("network_sha256"),
             "config_hash": m.info.get("config_hash"), "format": m.info.get("format", "pytorch"),
             "origin": origin_label(m.info)}
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
    write_json(out_dir / name, provenance, default=str)
