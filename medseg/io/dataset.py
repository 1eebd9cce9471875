"""Dataset discovery: a Medical Segmentation Decathlon (MSD) folder to a list of cases.

Layout::

    DATASET/dataset.json        name, modality, labels, training [{image, label}], test [image, ...]
    DATASET/imagesTr/ID.nii.gz  DATASET/labelsTr/ID.nii.gz
    DATASET/imagesTs/ID.nii.gz  DATASET/labelsTs/ID.nii.gz   (test labels optional)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import DatasetError, require_exists
from medseg.io.nifti import strip_nifti_suffix


@dataclass(frozen=True)
class Case:
    """One image (and optionally its label map). ``id`` is derived from the file name, never from headers."""

    id: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class Dataset:
    """A discovered dataset."""

    root: Path
    name: str
    modality: dict[str, str]
    labels: dict[int, str]
    training: list[Case]
    test: list[Case]


def _case_id(path: Path) -> str:
    stem = strip_nifti_suffix(path.name)
    return stem.rsplit(".", 1)[0] if "." in stem else stem


def load_dataset(root: str | Path) -> Dataset:
    """Reads ``dataset.json`` and checks that every listed file exists.

    Args:
        root: The dataset folder.

    Returns:
        The :class:`Dataset`; test cases carry a label when ``labelsTs/<same name>`` exists.

    Raises:
        InputError: ``PATH_NOT_FOUND`` when the folder does not exist.
        DatasetError: ``DATASET_JSON_MISSING``, ``DATASET_JSON_INVALID`` or ``DATASET_FILES_MISSING``
            (listing the missing case IDs).
    """
    root = Path(root)
    require_exists(root, "dataset folder")
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(
            "DATASET_JSON_MISSING", f"no dataset.json in {root}", "an MSD dataset folder holds dataset.json"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        labels = {int(k): str(v) for k, v in meta["labels"].items()}
        training_entries = meta.get("training", [])
        test_entries = meta.get("test", [])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DatasetError("DATASET_JSON_INVALID", f"{meta_path}: cannot parse ({exc})") from None

    training = [
        Case(_case_id(Path(e["image"])), (root / e["image"]).resolve(), (root / e["label"]).resolve())
        for e in training_entries
    ]
    test = []
    for entry in test_entries:
        image = (root / (entry["image"] if isinstance(entry, dict) else entry)).resolve()
        label = root / "labelsTs" / image.name
        test.append(Case(_case_id(image), image, label.resolve() if label.is_file() else None))

    missing = sorted(
        {c.id for c in training if not (c.image.is_file() and c.label is not None and c.label.is_file())}
        | {c.id for c in test if not c.image.is_file()}
    )
    if missing:
        raise DatasetError(
            "DATASET_FILES_MISSING",
            f"{len(missing)} case(s) listed in dataset.json lack files: {', '.join(missing[:20])}",
            "check imagesTr/labelsTr/imagesTs against dataset.json",
        )
    return Dataset(
        root=root.resolve(),
        name=str(meta.get("name", root.name)),
        modality={str(k): str(v) for k, v in meta.get("modality", {}).items()},
        labels=labels,
        training=training,
        test=test,
    )
