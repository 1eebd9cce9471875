"""Folder inference: many inputs -> one label file each + ``manifest.json``.

One failing case never stops the others: it is recorded in the manifest with its error code, and the run
ends non-zero. Outputs are written atomically, never inside the input tree, and existing outputs are only
replaced with ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from medseg.errors import InputError, MedsegError, OutputError, require_exists
from medseg.fsutil import sha256_file
from medseg.inference.predictor import Predictor
from medseg.io.image2d import is_image2d
from medseg.io.readers import case_id as case_id_of
from medseg.io.readers import files_by_id, read_volume, write_labels

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


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


def find_inputs(path: Path) -> list[Path]:
    """A file, or the NIfTI files and 2D pictures directly inside a folder (sorted).

    Raises:
        InputError: ``PATH_NOT_FOUND``; ``NO_INPUTS`` when a folder holds no readable file.
    """
    require_exists(path, "input")
    if path.is_file():
        return [path]
    files = list(files_by_id(path).values())
    if not files:
        raise InputError("NO_INPUTS", f"no .nii/.nii.gz/.png/.jpg/.tif files in {path}")
    return files


def check_output_location(inputs_root: Path, out_dir: Path) -> None:
    """Refuses an output folder inside the input tree.

    Raises:
        OutputError: ``OUTPUT_INSIDE_INPUT``.
    """
    root = (inputs_root if inputs_root.is_dir() else inputs_root.parent).resolve()
    out = out_dir.resolve()
    if out == root or root in out.parents:
        raise OutputError(
            "OUTPUT_INSIDE_INPUT", f"output folder {out_dir} lies inside the input folder {root}", "choose another -o"
        )


def predict_folder(predictor: Predictor, inputs: Path, out_dir: Path, overwrite: bool = False) -> list[CaseResult]:
    """Predicts a NIfTI file or every NIfTI file in a folder (see :func:`predict_files`).

    Raises:
        InputError: ``PATH_NOT_FOUND`` / ``NO_INPUTS``.
        OutputError: ``OUTPUT_INSIDE_INPUT``.
    """
    files = find_inputs(inputs)
    check_output_location(inputs, out_dir)
    return predict_files(predictor, files, out_dir, overwrite)


def predict_files(predictor: Predictor, files: list[Path], out_dir: Path, overwrite: bool = False) -> list[CaseResult]:
    """Predicts each file; writes ``out_dir/<case_id>.nii.gz`` (``.png`` for 2D pictures) and ``manifest.json``.

    Args:
        predictor: A loaded :class:`Predictor`.
        files: NIfTI images or 2D pictures.
        out_dir: Output folder (created).
        overwrite: Replace existing outputs; otherwise such cases fail with ``OUTPUT_EXISTS``.

    Returns:
        One :class:`CaseResult` per file, in order.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[CaseResult] = []
    from medseg.progress import progress_bar

    with progress_bar() as progress:
        task = progress.add_task("predicting", total=len(files))
        for path in files:
            case_id = case_id_of(path)
            target = out_dir / (f"{case_id}.png" if is_image2d(path) else f"{case_id}.nii.gz")
            start = time.perf_counter()
            result = CaseResult(case_id, str(path), "failed")
            try:
                if target.exists() and not overwrite:
                    raise OutputError("OUTPUT_EXISTS", f"{target.name} exists", "pass --overwrite to replace it")
                labels = predictor.predict(read_volume(path))
                write_labels(labels, out_dir, case_id, path)
                result.status, result.output, result.sha256 = "ok", target.name, sha256_file(target)
            except MedsegError as exc:
                result.error_code, result.error = exc.code, exc.one_line()
            except Exception as exc:  # noqa: BLE001 - per-case isolation: record and carry on
                result.error_code, result.error = "INTERNAL_ERROR", f"{type(exc).__name__}: {exc}"
                log.debug("case %s failed:\n%s", case_id, traceback.format_exc())
            result.seconds = round(time.perf_counter() - start, 3)
            if result.status != "ok":
                log.error("case %s failed: %s", case_id, result.error)
            results.append(result)
            progress.update(task, advance=1)
    manifest = {
        "model": predictor.info.get("dataset"),
        "n_ok": sum(r.status == "ok" for r in results),
        "n_failed": sum(r.status == "failed" for r in results),
        "cases": [asdict(r) for r in results],
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return results
