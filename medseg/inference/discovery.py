"""What to predict: a file, a DICOM series folder, or a folder of cases (image files and DICOM series mixed).

Image files directly inside the folder are one case each (case ID = file name without its ending). Every
other file below the folder is scanned as DICOM: each image series is one case named
``series_<index>_<UID hash>`` (never from patient tags or folder names, which PACS exports often build from
patient names). Non-image DICOM objects (RTSTRUCT, SR, SEG ...) and localizers are reported as skipped;
DICOM files that cannot be used (no transfer syntax, unreadable header) as failed; non-DICOM clutter
(README, .DS_Store) is counted.

The manifest records each input relative to the input folder: an image file by its name, a DICOM series by
its case ID and a DICOM file by its path hash (:func:`medseg.io.dicom_headers.file_label`), so no absolute
path, DICOM folder or DICOM file name (PACS exports name them after patients) reaches an output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import InputError, describe, require_exists
from medseg.io.dicom_headers import DicomSeries, file_label, is_dicom_file, scan_paths, uid_hash, walk_files
from medseg.io.readers import case_id as file_case_id
from medseg.io.readers import image_entries, is_supported, unique_ids

NOT_CASES = ("DICOM_NOT_DICOM",)  # counted, not listed
SKIPPED = ("DICOM_NOT_IMAGE",)  # listed as skipped (RELIABILITY.md 3); images without geometry fail (11)


@dataclass
class CaseInput:
    """One case to predict, or one input reported without prediction (``status`` skipped/failed)."""

    case_id: str
    source: Path | tuple[Path, ...]  # file, channel files, or the first file of a DICOM series
    series: DicomSeries | None = None
    status: str = "pending"  # pending | skipped | failed
    error_code: str | None = None
    error: str | None = None
    recorded: str | None = None  # what the manifest records as the input (relative, never an absolute path)

    def __post_init__(self) -> None:
        if self.recorded is None:
            self.recorded = self.path.name

    @property
    def path(self) -> Path:
        """The (first) input file."""
        return self.source if isinstance(self.source, Path) else self.source[0]

    @property
    def is_dicom(self) -> bool:
        return self.series is not None


@dataclass
class Discovery:
    """The cases found under an input, plus counts of ignored files by reason."""

    cases: list[CaseInput]
    ignored: dict[str, int]


def discover(path: str | Path) -> Discovery:
    """Finds the cases of ``path`` (file or folder), sorted by case ID.

    Raises:
        InputError: ``PATH_NOT_FOUND``; ``NO_INPUTS`` when nothing at all could be a case.
        DatasetError: ``DATASET_DUPLICATE_ID`` when two image files have one case ID (``a.nii.gz``, ``a.nrrd``).
    """
    path = Path(path)
    require_exists(path, "input")
    if path.is_file() and is_supported(path):
        return Discovery([CaseInput(file_case_id(path), path, recorded=path.name)], {})
    if path.is_file():
        if not is_dicom_file(path):
            raise InputError("NO_INPUTS", f"{path.name} is neither a supported image file nor DICOM")
        files, images = [path], []
    else:
        images = image_entries(path)  # unreadable ones too: each becomes a failed case, never a silent loss
        files = [p for p in walk_files(path) if not (p.parent == path and is_supported(p))]
    cases = [CaseInput(cid, p, recorded=p.name) for cid, p in unique_ids(images, "the input folder").items()]
    ignored: dict[str, int] = {}
    if files:
        scan = scan_paths(path, files)
        for series in scan.series:
            cases.append(CaseInput(series.name, series.files[0].path, series, recorded=f"DICOM {series.name}"))
        placeless: dict[str, list[Path]] = {}  # images without geometry: one failed case per series
        for skipped in scan.skipped:
            if skipped.code == "DICOM_NO_GEOMETRY" and skipped.series_uid is not None:
                placeless.setdefault(skipped.series_uid, []).append(skipped.path)
        for uid, paths in placeless.items():
            name = f"series_nogeometry_{uid_hash(uid)}"
            cases.append(CaseInput(name, paths[0], None, "failed", "DICOM_NO_GEOMETRY",
                                   f"DICOM_NO_GEOMETRY: {len(paths)} image(s) without ImagePositionPatient/"
                                   "ImageOrientationPatient (hint: positions are never assumed; re-export the series "
                                   "with its geometry)", recorded=f"DICOM {name}"))
        for skipped in scan.skipped:
            if skipped.code == "DICOM_NO_GEOMETRY" and skipped.series_uid is not None:
                continue
            if skipped.code in NOT_CASES:
                ignored[skipped.code] = ignored.get(skipped.code, 0) + 1
                continue
            status = "skipped" if skipped.code in SKIPPED else "failed"
            label = file_label(skipped.path)
            cases.append(CaseInput(label.replace(" ", "_"), skipped.path, None, status, skipped.code,
                                   f"{skipped.code}: {skipped.reason}", recorded=f"DICOM {label}"))
    if not cases:
        raise InputError(
            "NO_INPUTS", f"no image files or DICOM series in {path}",
            "expected .nii/.nii.gz/.nrrd/.mha/.png/.jpg/.tif files or DICOM series",
        )
    cases.sort(key=lambda c: c.case_id)
    return Discovery(cases, ignored)


def shard(cases: list[CaseInput], index: int, count: int) -> list[CaseInput]:
    """Every ``count``-th case starting at ``index`` (cases sorted by ID, so all workers agree).

    Raises:
        InputError: ``SHARD_INVALID`` unless ``0 <= index < count``.
    """
    if count < 1 or not 0 <= index < count:
        raise InputError("SHARD_INVALID", f"shard {index}/{count} is invalid", "use --shard i/n with 0 <= i < n")
    return cases[index::count]


#: The environment ``--shard auto`` reads (:func:`scheduler_shard`).
SLURM_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")
KUBERNETES_VARS = ("JOB_COMPLETION_INDEX", "MEDSEG_SHARD_COUNT")


def scheduler_shard(environ: dict[str, str] | None = None) -> tuple[int, int]:
    """``--shard auto``: this worker's ``(index, count)`` from the job scheduler that started it.

    - a Slurm array job (``sbatch --array=A-B[:S]``): index ``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / step``
      of ``SLURM_ARRAY_TASK_COUNT`` (arrays may start at 1 and step; a ``%`` limit does not change the count);
    - a Kubernetes indexed Job (``completionMode: Indexed``): ``JOB_COMPLETION_INDEX``, which Kubernetes sets, of
      ``MEDSEG_SHARD_COUNT``, which the Job sets to its ``completions`` (Kubernetes passes no count).

    Raises:
        InputError: ``SHARD_INVALID`` outside both (every worker would take every case, into one folder), or for
            values that are not whole numbers or give no valid shard.
    """
    env = dict(os.environ if environ is None else environ)
    try:
        if "SLURM_ARRAY_TASK_ID" in env:
            task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
            first, step = int(env.get("SLURM_ARRAY_TASK_MIN", "0")), int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
            index, rest = divmod(task - first, step)
            found = "Slurm array task"
        elif "JOB_COMPLETION_INDEX" in env:
            index, rest, found = int(env["JOB_COMPLETION_INDEX"]), 0, "Kubernetes indexed Job"
            if "MEDSEG_SHARD_COUNT" not in env:
                raise InputError("SHARD_INVALID", "--shard auto in a Kubernetes indexed Job needs MEDSEG_SHARD_COUNT",
                                 "set it in the Job's env to spec.completions")
            count = int(env["MEDSEG_SHARD_COUNT"])
        else:
            raise InputError("SHARD_INVALID", "--shard auto found neither a Slurm array job nor a Kubernetes indexed Job",
                             "run it as an sbatch --array task or an Indexed Job, or give --shard i/n")
    except (KeyError, ValueError) as exc:
        raise InputError("SHARD_INVALID", f"--shard auto: the scheduler's variables are incomplete or not numbers "
                         f"({describe(exc)})", "give --shard i/n") from None
    if rest:
        raise InputError("SHARD_INVALID", f"--shard auto: {found} {index} is off the array's step")
    shard([], index, count)
    import logging

    logging.getLogger(__name__).info("--shard auto: %s, shard %d of %d", found, index, count)
    return index, count


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``; ``"auto"`` -> :func:`scheduler_shard`.

    Raises:
        InputError: ``SHARD_INVALID``.
    """
    if text.strip().lower() == "auto":
        return scheduler_shard()
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise InputError("SHARD_INVALID", f"--shard expects i/n (e.g. 0/4) or auto, got {text!r}") from None
    shard([], index, count)
    return index, count
