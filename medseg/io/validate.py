"""Dataset integrity checks (``medseg validate``): everything nnU-Net's ``verify_dataset_integrity`` checks,
and more, reported per case instead of stopping at the first problem.

Per case: files present and readable (corrupt gzip, truncated files, NaN/Inf, sheared affines — the readers'
codes); channel count equals the declared one; label map single-channel and integer-valued; image and label
agree in shape, spacing, origin and direction (nnU-Net only warns on origin/direction; we fail); label values
are among the declared ones. Per dataset: declared case count matches, labels without images, duplicate IDs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DatasetError, MedsegError
from medseg.io.dataset import Case, Dataset, load_dataset
from medseg.io.readers import read_channels, read_volume
from medseg.io.volume import Volume

SPACING_RTOL = 1e-3
POSITION_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-3


@dataclass
class Problem:
    """One finding: the case (or ``*`` for the dataset), a stable code and what was found."""

    case_id: str
    code: str
    message: str


@dataclass
class ValidationReport:
    """All problems of a dataset; empty means valid."""

    root: Path
    layout: str
    n_training: int
    n_test: int
    labels: dict[int, str]
    problems: list[Problem] = field(default_factory=list)
    sources: dict = field(default_factory=dict)  # DICOM studies: per case the ROIs of each label (dicom_labels)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def by_case(self) -> dict[str, list[Problem]]:
        """Problems grouped by case ID."""
        out: dict[str, list[Problem]] = {}
        for p in self.problems:
            out.setdefault(p.case_id, []).append(p)
        return out


def check_pair(image: Volume, label: Volume, case_id: str) -> None:
    """Raises when an image and its label map do not share one grid.

    Raises:
        DatasetError: ``IMAGE_LABEL_MISMATCH`` naming what differs (shape, spacing, origin or direction).
    """
    differences = []
    if image.spatial_shape != label.spatial_shape:
        differences.append(f"shape {image.spatial_shape} vs {label.spatial_shape}")
    else:
        ndim = len(image.spatial_shape)
        si, sl = np.array(image.spacing), np.array(label.spacing)
        if not np.allclose(si, sl, rtol=SPACING_RTOL, atol=0):
            differences.append(f"spacing {tuple(np.round(si, 4))} vs {tuple(np.round(sl, 4))}")
        if np.abs(image.affine[:3, 3] - label.affine[:3, 3]).max() > POSITION_ATOL_MM:
            differences.append(f"origin {tuple(np.round(image.affine[:3, 3], 3))} vs {tuple(np.round(label.affine[:3, 3], 3))}")
        di = image.affine[:3, :ndim] / np.where(si == 0, 1, si)
        dl = label.affine[:3, :ndim] / np.where(sl == 0, 1, sl)
        if np.abs(di - dl).max() > DIRECTION_ATOL:
            differences.append("direction (orientation) differs")
    if differences:
        raise DatasetError(
            "IMAGE_LABEL_MISMATCH", f"case {case_id}: image and label differ in " + "; ".join(differences),
            "re-export the label on the image's grid",
        )


def check_label_values(label: Volume, declared: dict[int, str], case_id: str) -> None:
    """Raises when a label map is not integer-valued or holds undeclared values.

    Raises:
        DatasetError: ``LABEL_NOT_INTEGER``, ``LABEL_VALUES_UNEXPECTED`` (listing the values).
    """
    data = label.array
    if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
        raise DatasetError("LABEL_NOT_INTEGER", f"case {case_id}: the label map holds non-integer values")
    found = {int(v) for v in np.unique(data)}
    unexpected = sorted(found - set(declared))
    if declared and unexpected:
        raise DatasetError(
            "LABEL_VALUES_UNEXPECTED",
            f"case {case_id}: label values {unexpected} are not declared (declared: {sorted(declared)})",
            "fix the label map or declare the labels in dataset.json",
        )


def _expected_channels(dataset: Dataset) -> int | None:
    return len(dataset.modality) or None


def check_case(case: Case, dataset: Dataset, with_label: bool) -> tuple[Volume | None, Volume | None, list[Problem]]:
    """Reads one case and runs every per-case check on it (``medseg validate``, and training's fingerprint pass).

    Returns:
        ``(image, label, problems)``; image or label is None when it could not be read (or not asked for).
    """
    problems: list[Problem] = []

    def add(exc: MedsegError) -> None:
        problems.append(Problem(case.id, exc.code, exc.message))

    try:
        image = read_channels(case.images)
    except MedsegError as exc:
        add(exc)
        return None, None, problems
    expected = _expected_channels(dataset)
    if expected is not None and image.array.shape[0] != expected:
        problems.append(Problem(case.id, "CHANNELS_MISMATCH",
                                f"image has {image.array.shape[0]} channel(s), the dataset declares {expected}"))
    if not with_label or case.label is None:
        return image, None, problems
    try:
        label = read_volume(case.label)
    except MedsegError as exc:
        add(exc)
        return image, None, problems
    if label.array.shape[0] != 1:
        problems.append(Problem(case.id, "LABEL_CHANNELS", f"label map has {label.array.shape[0]} channels, expected 1"))
        return image, label, problems
    for check in (lambda: check_pair(image, label, case.id), lambda: check_label_values(label, dataset.labels, case.id)):
        try:
            check()
        except MedsegError as exc:
            add(exc)
    return image, label, problems


def refuse(problems: list[Problem], what: str) -> None:
    """Raises the first problem's code, naming every failing case (at most 20) and what failed.

    Raises:
        DatasetError: the first problem's code (e.g. ``LABEL_VALUES_UNEXPECTED``, ``IMAGE_LABEL_MISMATCH``).
    """
    if not problems:
        return
    cases = sorted({p.case_id for p in problems})
    listed = "; ".join(f"{p.case_id}: {p.code}" for p in problems[:20]) + (" ..." if len(problems) > 20 else "")
    first = problems[0]
    raise DatasetError(
        first.code, f"{len(cases)} {what} case(s) failed the dataset checks ({listed}); first: {first.message}",
        "run `medseg validate DATASET` for the table of every problem, fix them, then train again",
    )


def validate_dataset(root: str | Path, labels: Any = None, cache: Path | None = None) -> ValidationReport:
    """Checks every case of a dataset (any layout of :mod:`medseg.io.dataset`; ``labels`` and ``cache`` as there).

    A DICOM-study dataset's report also holds, per case, which ROI went to which label, the unmatched ROIs and
    what was skipped (:attr:`ValidationReport.sources`).

    Raises:
        InputError / DatasetError: only when the dataset cannot be discovered at all (no layout, bad JSON).
    """
    dataset = load_dataset(root, strict=False, labels=labels, cache=cache)
    report = ValidationReport(Path(root), dataset.layout, len(dataset.training), len(dataset.test), dataset.labels,
                              sources=dataset.sources)
    missing = set()
    for cid, code, message in dataset.problems:
        report.problems.append(Problem(cid, code, message))
        if code == "DATASET_FILES_MISSING":
            missing.add(cid)
    if dataset.declared_training is not None and int(dataset.declared_training) != len(dataset.training):
        report.problems.append(Problem("*", "DATASET_COUNT_MISMATCH", f"dataset.json declares numTraining="
                                       f"{dataset.declared_training}, found {len(dataset.training)} training case(s)"))
    if not dataset.training:
        report.problems.append(Problem("*", "DATASET_EMPTY", "no training cases found"))
    for case in dataset.training:
        if case.id not in missing:
            report.problems.extend(check_case(case, dataset, with_label=True)[2])
    for case in dataset.test:
        if case.id not in missing:
            report.problems.extend(check_case(case, dataset, with_label=case.label is not None)[2])
    return report
