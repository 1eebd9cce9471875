"""Dataset discovery: five layouts to one list of cases.

1. **MSD** (Medical Segmentation Decathlon)::

       DATASET/dataset.json         name, modality {"0": "CT"}, labels {"0": "background", ...},
                                    training [{image, label}], test [image, ...]
       DATASET/imagesTr/ID.nii.gz   DATASET/labelsTr/ID.nii.gz   (4D images hold the channels)

2. **nnU-Net v2 raw**::

       DATASET/dataset.json         channel_names {"0": "CT"}, labels {"background": 0, ...}, numTraining,
                                    file_ending ".nii.gz"
       DATASET/imagesTr/ID_0000.nii.gz [ID_0001 ...]   DATASET/labelsTr/ID.nii.gz   DATASET/imagesTs/...

3. **Paired folders** (no dataset.json): ``DATASET/images/ID.<ext>`` and ``DATASET/labels/ID.<ext>``; an
   image may also be a DICOM series folder ``DATASET/images/ID/``. Label names come from an optional
   ``DATASET/labels.json`` (``{"0": "background", "1": "liver"}``), else from the values found in the labels.

4. **DICOM studies** (no dataset.json, CSV or images/+labels/): a folder of DICOM image series with the RTSTRUCT
   and/or DICOM-SEG objects that label them; the config's ``data.labels`` says which ROIs make which label
   (:mod:`medseg.io.dicom_labels`). The labelled series are rasterised once into a cached paired dataset.

5. **CSV manifest**: a ``.csv`` file (or ``DATASET/dataset.csv``) with columns ``case_id,image,label`` and
   optional ``split`` (``train``/``test``); ``image`` may list several channel files separated by ``;``.
   Paths are relative to the CSV. Label names as for paired folders.

Case IDs come from file names or the CSV, never from image headers.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import DatasetError, describe, require_exists
from medseg.io.dicom_labels import holds_dicom
from medseg.io.readers import case_id as file_case_id
from medseg.io.readers import duplicate_id, is_supported

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One image (one or more channel files, or a DICOM folder) and optionally its label map."""

    id: str
    image: Path
    label: Path | None
    channels: tuple[Path, ...] = ()

    @property
    def images(self) -> tuple[Path, ...]:
        """All channel files (just ``image`` for single-file images)."""
        return self.channels or (self.image,)


@dataclass(frozen=True)
class Dataset:
    """A discovered dataset."""

    root: Path
    name: str
    modality: dict[str, str]
    labels: dict[int, str]
    training: list[Case]
    test: list[Case]
    layout: str = "msd"
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (case id, code, message)
    declared_training: int | None = None
    sources: dict = field(default_factory=dict)  # DICOM studies: per case the ROIs each label came from


def _read_json(path: Path) -> dict:
    from medseg.fsutil import read_json

    data = read_json(path, "DATASET_JSON_INVALID", "dataset description", error=DatasetError)
    if not isinstance(data, dict):
        raise DatasetError("DATASET_JSON_INVALID", f"{path}: expected a JSON object")
    return data


def load_configured(data: Any, strict: bool = True) -> Dataset:
    """:func:`load_dataset` of a config's ``data`` section (its dataset, ``labels`` rules and ``cache_dir``)."""
    return load_dataset(data.dataset or "", strict, labels=data.labels, cache=dicom_cache(data))


def dicom_cache(data: Any) -> Path | None:
    """Where a config's ``data`` section puts rasterised DICOM-study datasets: ``cache_dir/dicom-labels``, or None for
    :func:`medseg.io.dicom_labels.default_cache`."""
    return Path(data.cache_dir) / "dicom-labels" if data.cache_dir else None


def load_dataset(root: str | Path, strict: bool = True, *, labels: Any = None, cache: Path | None = None) -> Dataset:
    """Discovers a dataset in any of the five layouts and checks that every case has its files.

    Args:
        root: Dataset folder, or a CSV manifest file.
        strict: Raise on missing files (training and prediction); with ``False`` the problems are listed in
            :attr:`Dataset.problems` instead (``medseg validate``).
        labels: ``data.labels`` (a DICOM-study folder's ROI rules); ignored by the other layouts.
        cache: Where a DICOM-study folder's rasterised cases go (default :func:`medseg.io.dicom_labels.default_cache`).

    Raises:
        InputError: ``PATH_NOT_FOUND``.
        DatasetError: ``DATASET_JSON_MISSING`` (no recognisable layout), ``DATASET_JSON_INVALID``,
            ``DATASET_FILES_MISSING`` (listing the case IDs), ``DATASET_DUPLICATE_ID`` (two files, training or
            test, with one case ID: naming both).
    """
    root = Path(root)
    require_exists(root, "dataset folder")
    if root.is_file() and root.suffix.lower() == ".csv":
        dataset = _load_csv(root)
    elif (root / "dataset.json").is_file():
        meta = _read_json(root / "dataset.json")
        dataset = _load_nnunet(root, meta) if "channel_names" in meta else _load_msd(root, meta)
    elif (root / "dataset.csv").is_file():
        dataset = _load_csv(root / "dataset.csv")
    elif (root / "images").is_dir() and (root / "labels").is_dir():
        dataset = _load_paired(root)
    elif root.is_dir() and holds_dicom(root):
        dataset = _load_dicom_studies(root, labels, cache, strict)
    else:
        raise DatasetError(
            "DATASET_JSON_MISSING", f"no dataset.json, dataset.csv, images/+labels/ folders or DICOM files in {root}",
            "see `medseg validate -h` for the supported layouts",
        )
    _refuse_duplicate_ids(dataset, strict)
    if not dataset.labels and dataset.training:
        dataset = _with_inferred_labels(dataset)
    missing = sorted(
        {c.id for c in dataset.training if not (all(p.exists() for p in c.images) and c.label and c.label.exists())}
        | {c.id for c in dataset.test if not all(p.exists() for p in c.images)}
    )
    if missing and strict:
        raise DatasetError(
            "DATASET_FILES_MISSING",
            f"{len(missing)} case(s) lack files: {', '.join(missing[:20])}",
            "check the image and label folders against the dataset description",
        )
    dataset.problems.extend((m, "DATASET_FILES_MISSING", "image or label file missing") for m in missing)
    return dataset


def _refuse_duplicate_ids(dataset: Dataset, strict: bool) -> None:
    """One case ID names one case of the dataset (training and test together)."""
    listed = [p for p in dataset.problems if p[1] == "DATASET_DUPLICATE_ID"]  # CSV rows with a repeated case_id
    if listed and strict:
        raise DatasetError("DATASET_DUPLICATE_ID", f"case ID {listed[0][0]!r}: {listed[0][2]}",
                           "give every row its own case_id")
    seen: dict[str, Path] = {}
    for case in [*dataset.training, *dataset.test]:
        if case.id in seen:
            error = duplicate_id(case.id, seen[case.id], case.image, f"dataset {dataset.name}")
            if strict:
                raise error
            dataset.problems.append((case.id, error.code, error.message))
        else:
            seen[case.id] = case.image


def _labels_from_msd(meta: dict, path: Path) -> dict[int, str]:
    try:
        return {int(k): str(v) for k, v in meta["labels"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DatasetError("DATASET_JSON_INVALID", f"{path.name}: 'labels' must map integers to names ({describe(exc)})") from None


def _load_msd(root: Path, meta: dict) -> Dataset:
    labels = _labels_from_msd(meta, root / "dataset.json")
    try:
        training = [
            Case(file_case_id(e["image"]), (root / e["image"]).resolve(), (root / e["label"]).resolve())
            for e in meta.get("training", [])
        ]
        test = []
        for entry in meta.get("test", []):
            image = (root / (entry["image"] if isinstance(entry, dict) else entry)).resolve()
            label = root / "labelsTs" / image.name
            test.append(Case(file_case_id(image), image, label.resolve() if label.is_file() else None))
        modality = {str(k): str(v) for k, v in meta.get("modality", {}).items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise DatasetError("DATASET_JSON_INVALID", f"dataset.json: bad training/test/modality entry ({describe(exc)})") from None
    declared = meta.get("numTraining")
    if declared is not None and (not isinstance(declared, int) or isinstance(declared, bool)):
        raise DatasetError("DATASET_JSON_INVALID", f"dataset.json: numTraining must be a whole number, found {declared!r:.40}")
    return Dataset(
        root=root.resolve(), name=str(meta.get("name", root.name)), modality=modality,
        labels=labels, training=training, test=test, layout="msd", declared_training=declared,
    )


def _channel_groups(folder: Path, ending: str) -> dict[str, dict[int, Path]]:
    groups: dict[str, dict[int, Path]] = {}
    if not folder.is_dir():
        return groups
    for path in sorted(folder.iterdir()):
        if not path.name.endswith(ending):
            continue
        match = _CHANNEL.match(path.name[: -len(ending)])
        if match:
            groups.setdefault(match["case"], {})[int(match["channel"])] = path.resolve()
    return groups


def _load_nnunet(root: Path, meta: dict) -> Dataset:
    try:
        channels = {str(k): str(v) for k, v in meta["channel_names"].items()}
        labels = {int(v): str(k) for k, v in meta["labels"].items() if not isinstance(v, (list, tuple))}
        ending = str(meta.get("file_ending", ".nii.gz"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DatasetError("DATASET_JSON_INVALID", "dataset.json: nnU-Net dataset.json needs channel_names, labels "
                           f"(name: int) and file_ending ({describe(exc)})") from None
    n_channels = len(channels)
    problems: list[tuple[str, str, str]] = []

    def cases(images: str, labels_dir: str | None) -> list[Case]:
        out = []
        for case, found in _channel_groups(root / images, ending).items():
            files = tuple(found.get(c, root / images / f"{case}_{c:04d}{ending}") for c in range(n_channels))
            extra = sorted(set(found) - set(range(n_channels)))
            if extra:
                problems.append((case, "CHANNELS_MISMATCH", f"unexpected channel file(s) {extra}; "
                                 f"dataset.json declares {n_channels}"))
            label = (root / labels_dir / f"{case}{ending}") if labels_dir else None
            if label is not None and not label.is_file() and labels_dir == "labelsTs":
                label = None
            out.append(Case(case, files[0], label.resolve() if label else None, files if n_channels > 1 else ()))
        return out

    training, test = cases("imagesTr", "labelsTr"), cases("imagesTs", "labelsTs")
    known = {c.id for c in training}
    for label in sorted((root / "labelsTr").glob(f"*{ending}")) if (root / "labelsTr").is_dir() else []:
        if label.name[: -len(ending)] not in known:
            problems.append((label.name[: -len(ending)], "DATASET_FILES_MISSING", "label without an image"))
    return Dataset(
        root=root.resolve(), name=str(meta.get("name", root.name)), modality=channels, labels=labels,
        training=training, test=test, layout="nnunet", problems=problems,
        declared_training=meta.get("numTraining"),
    )


def _load_dicom_studies(root: Path, labels: Any, cache: Path | None, strict: bool) -> Dataset:
    """A folder of DICOM studies labelled by RTSTRUCT/SEG, rasterised into a cached paired dataset."""
    from dataclasses import replace

    from medseg.io.dicom_labels import label_rules, materialise

    if not labels:
        raise DatasetError(
            "LABEL_RULES_MISSING", f"{root.name} is a folder of DICOM studies, and the config names no labels",
            "declare data.labels, e.g. --set 'data.labels={\"tumour\": [\"^gtv\"]}' (docs/dicom-labels.md)",
        )
    folder, sources = materialise(root, label_rules(labels), cache)
    problems = [tuple(p) for p in sources["problems"]]
    if problems and strict:
        case, code, message = problems[0]
        raise DatasetError(code, f"{len(problems)} problem(s) in the DICOM studies; first, {case}: {message}",
                           "run `medseg validate DATASET -c CONFIG` for every case's ROIs and problems")
    dataset = _load_paired(folder)
    return replace(dataset, root=root.resolve(), name=root.name, layout="dicom",
                   modality={"0": sources["modality"]} if sources.get("modality") else {},
                   problems=[*dataset.problems, *problems], sources=sources)


def _labels_sidecar(folder: Path) -> dict[int, str]:
    sidecar = folder / "labels.json"
    return _labels_from_msd({"labels": _read_json(sidecar)}, sidecar) if sidecar.is_file() else {}


def _load_paired(root: Path) -> Dataset:
    def entries(folder: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for p in sorted(folder.iterdir()):
            if p.is_dir() or is_supported(p) or p.suffix.lower() == ".dcm":
                cid = file_case_id(p)
                if cid in found:
                    raise duplicate_id(cid, found[cid], p, f"folder {folder.name}")
                found[cid] = p.resolve()
        return found

    images, labels = entries(root / "images"), entries(root / "labels")
    training = [Case(cid, path, labels.get(cid, root / "labels" / f"{cid}.missing")) for cid, path in images.items()]
    problems = [(cid, "DATASET_FILES_MISSING", "label without an image") for cid in sorted(set(labels) - set(images))]
    return Dataset(
        root=root.resolve(), name=root.name, modality={}, labels=_labels_sidecar(root), training=training,
        test=[], layout="paired", problems=problems,
    )


def _load_csv(path: Path) -> Dataset:
    base = path.parent
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError("DATASET_JSON_INVALID", f"{path.name}: cannot read the CSV manifest ({describe(exc, path)})") from None
    if not rows or not {"case_id", "image"} <= set(rows[0]):
        raise DatasetError("DATASET_JSON_INVALID", f"{path}: needs columns case_id,image[,label,split]")
    training: list = []
    test: list = []
    seen: set[str] = set()
    problems: list[tuple[str, str, str]] = []
    for row in rows:
        cid = (row.get("case_id") or "").strip()
        if not cid or cid in seen:
            problems.append((cid or "?", "DATASET_DUPLICATE_ID", "empty or repeated case_id"))
            continue
        seen.add(cid)
        files = tuple((base / p.strip()).resolve() for p in (row.get("image") or "").split(";") if p.strip())
        label = (base / row["label"].strip()).resolve() if (row.get("label") or "").strip() else None
        case = Case(cid, files[0] if files else base / f"{cid}.missing", label, files if len(files) > 1 else ())
        split = (row.get("split") or "train").strip().lower()
        (test if split == "test" else training).append(case)
    missing_labels = [c.id for c in training if c.label is None]
    problems.extend((cid, "DATASET_FILES_MISSING", "training case without a label") for cid in missing_labels)
    return Dataset(
        root=base.resolve(), name=path.stem, modality={}, labels=_labels_sidecar(base),
        training=[c for c in training if c.label is not None], test=test, layout="csv", problems=problems,
    )


def _with_inferred_labels(dataset: Dataset) -> Dataset:
    """Label names ``label_<v>`` for the values found in the training labels (paired/CSV without labels.json)."""
    import numpy as np

    from medseg.errors import MedsegError
    from medseg.io.readers import read_volume

    values: set[int] = {0}
    for case in dataset.training:
        if case.label is not None and case.label.exists():
            try:
                values |= {int(v) for v in np.unique(read_volume(case.label).array)}
            except MedsegError:
                continue  # reported by validation
    labels = {v: ("background" if v == 0 else f"label_{v}") for v in sorted(values)}
    return Dataset(**{**dataset.__dict__, "labels": labels})
