"""DICOM Segmentation (DICOM-SEG) output through highdicom, referencing the source series.

The label map must lie on the source series' own grid (the predictor guarantees this): frame ``k`` of the
segmentation is slice ``k`` of the sorted source series, so no resampling happens here. The default type is
BINARY with one segment per foreground label, named from the dataset's label names, in the label colours of the
previews, each identifying the model that made it (:mod:`medseg.io.dicom_derived`).

A DICOM-SEG object belongs to the source study: like every DICOM derived object it repeats the source's
patient and study modules (that is how a PACS files it; highdicom copies the required ones and nothing else).
medseg never copies those values anywhere else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.errors import OutputError
from medseg.io.dicom_derived import PATIENT_STUDY, SERIES_NUMBER_OFFSET, Producer, contributing_equipment, label_colour
from medseg.io.volume import Volume


def source_datasets(labels: Volume, source: Volume, what: str) -> list:
    """The source series' headers in slice order (frame/slice ``k`` of the label map is ``source``'s slice ``k``).

    Raises:
        OutputError: ``DICOM_SEG_NO_SOURCE`` when ``source`` is not a single-frame DICOM series read by medseg, or
            was resampled (gantry tilt); ``DICOM_SEG_GRID_MISMATCH`` when the grids differ.
    """
    import pydicom

    files = source.meta.get("dicom_files")
    if source.meta.get("source_format") != "dicom" or not files or len(source.spatial_shape) != 3:
        raise OutputError("DICOM_SEG_NO_SOURCE", f"{what} output needs a DICOM series input", "use NIfTI output")
    if "resampled" in source.meta:
        raise OutputError(
            "DICOM_SEG_NO_SOURCE", "the input series was resampled (gantry tilt), so no source frame matches",
            "use NIfTI output for tilted series",
        )
    if not labels.same_grid(source):
        raise OutputError("DICOM_SEG_GRID_MISMATCH", "the label map is not on the source series' grid")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    if len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1:
        raise OutputError("DICOM_SEG_NO_SOURCE", f"{what} for multi-frame sources is not supported yet")
    for ds in sources:  # type 2 attributes a scanner left out are present and empty in a derived object
        if not ds.get("StudyInstanceUID") or not ds.get("SeriesInstanceUID"):
            raise OutputError("DICOM_SEG_NO_SOURCE", f"the source series of the {what} lacks its study or series UID")
        for keyword in PATIENT_STUDY:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return sources


def foreground_values(labels: Volume, label_names: dict[int, str]) -> list[int]:
    """The named foreground label values, sorted.

    Raises:
        OutputError: ``DICOM_SEG_LABELS`` when the map holds a value with no name.
    """
    values = [v for v in sorted(label_names) if v > 0]
    top = int(labels.array.max()) if labels.array.size else 0
    if top > max(values, default=0) or (top > 0 and top not in label_names):
        raise OutputError("DICOM_SEG_LABELS", f"label map holds value {top} with no name")
    return values


def write_dicom_seg(
    labels: Volume,
    source: Volume,
    path: str | Path,
    label_names: dict[int, str],
    producer: Producer | None = None,
) -> Path:
    """Writes ``labels`` (``(1, X, Y, Z)`` integer map on ``source``'s grid) as a DICOM-SEG file.

    Args:
        labels: Label map from :meth:`Predictor.predict` for ``source``.
        source: The DICOM series volume as read by :func:`medseg.io.dicom.read_dicom` (its ``meta`` lists
            the source files in slice order).
        path: Output file (written atomically).
        label_names: ``{label value: name}``; background (0) is ignored.
        producer: The model that made it (:mod:`medseg.io.dicom_derived`): each segment's
            AlgorithmIdentificationSequence (name, version with the weights hash, parameters), the
            ContributingEquipmentSequence, ManufacturerModelName, SeriesDescription and the UID root.

    Returns:
        The written path.

    Raises:
        OutputError: see :func:`source_datasets` and :func:`foreground_values`.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medseg.fsutil import atomic_write

    producer = producer or Producer("medseg")
    sources = source_datasets(labels, source, "DICOM-SEG")
    values = foreground_values(labels, label_names)
    data = labels.array[0]
    # highdicom wants (frames, rows, columns) with segment numbers 1..n as values
    remap = np.zeros(int(max(values, default=0)) + 1, dtype=np.uint8)
    for number, value in enumerate(values, start=1):
        remap[value] = number
    frames = np.ascontiguousarray(remap[data].transpose(2, 1, 0))  # (Z, rows=Y, columns=X)
    identification = hd.AlgorithmIdentificationSequence(
        name=producer.model[:64], family=codes.cid7162.ArtificialIntelligence, version=producer.algorithm_version,
        parameters=producer.parameters,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(label_names[value])[:64],
            segmented_property_category=_concept(producer.code(str(label_names[value])).category),
            segmented_property_type=_concept(producer.code(str(label_names[value])).type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            display_color=hd.color.CIELabColor.from_rgb(*label_colour(value)),
        )
        for number, value in enumerate(values, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=producer.uid(),
        series_number=int(sources[0].get("SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET,
        sop_instance_uid=producer.uid(),
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name=producer.model[:64],
        software_versions=producer.version or "0",
        device_serial_number="0",
        series_description=producer.series_description,
        content_description=producer.description,
        contributing_equipment=[contributing_equipment(producer)],
        omit_empty_frames=False,
    )
    seg.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the SeriesDescription has an em dash (highdicom copies Latin-1)
    path = Path(path)
    return atomic_write(path, lambda tmp: seg.save_as(tmp))


def _concept(code: tuple[str, str, str]):
    import highdicom as hd

    scheme, value, meaning = code
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)
