"""DICOM Segmentation (DICOM-SEG) output through highdicom, referencing the source series.

The label map must lie on the source series' own grid (the predictor guarantees this): frame ``k`` of the
segmentation is slice ``k`` of the sorted source series, so no resampling happens here. The default type is
BINARY with one segment per foreground label, named from the dataset's label names.

A DICOM-SEG object belongs to the source study: like every DICOM derived object it repeats the source's
patient and study modules (that is how a PACS files it). medseg never copies those values anywhere else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.errors import OutputError
from medseg.io.volume import Volume


def write_dicom_seg(
    labels: Volume,
    source: Volume,
    path: str | Path,
    label_names: dict[int, str],
    *,
    algorithm: str = "medseg",
    algorithm_version: str = "",
    series_description: str = "medseg segmentation",
) -> Path:
    """Writes ``labels`` (``(1, X, Y, Z)`` integer map on ``source``'s grid) as a DICOM-SEG file.

    Args:
        labels: Label map from :meth:`Predictor.predict` for ``source``.
        source: The DICOM series volume as read by :func:`medseg.io.dicom.read_dicom` (its ``meta`` lists
            the source files in slice order).
        path: Output file (written atomically).
        label_names: ``{label value: name}``; background (0) is ignored.
        algorithm: Algorithm name recorded in each segment.
        algorithm_version: Its version.
        series_description: SeriesDescription of the new series.

    Returns:
        The written path.

    Raises:
        OutputError: ``DICOM_SEG_NO_SOURCE`` when ``source`` is not a DICOM series read by medseg, or was
            resampled (gantry tilt); ``DICOM_SEG_GRID_MISMATCH`` when the grids differ.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    import medseg
    from medseg.fsutil import atomic_write

    files = source.meta.get("dicom_files")
    if source.meta.get("source_format") != "dicom" or not files or len(source.spatial_shape) != 3:
        raise OutputError("DICOM_SEG_NO_SOURCE", "DICOM-SEG output needs a DICOM series input", "use NIfTI output")
    if "resampled" in source.meta:
        raise OutputError(
            "DICOM_SEG_NO_SOURCE", "the input series was resampled (gantry tilt), so no source frame matches",
            "use NIfTI output for tilted series",
        )
    if not labels.same_grid(source):
        raise OutputError("DICOM_SEG_GRID_MISMATCH", "the label map is not on the source series' grid")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    if len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1:
        raise OutputError("DICOM_SEG_NO_SOURCE", "DICOM-SEG for multi-frame sources is not supported yet")
    data = labels.array[0]
    values = [v for v in sorted(label_names) if v > 0]
    if data.max() > max(values, default=0):
        raise OutputError("DICOM_SEG_LABELS", f"label map holds value {int(data.max())} with no name")
    # highdicom wants (frames, rows, columns) with segment numbers 1..n as values
    remap = np.zeros(int(max(values, default=0)) + 1, dtype=np.uint8)
    for number, value in enumerate(values, start=1):
        remap[value] = number
    frames = np.ascontiguousarray(remap[data].transpose(2, 1, 0))  # (Z, rows=Y, columns=X)
    family = codes.cid7162.ArtificialIntelligence
    identification = hd.AlgorithmIdentificationSequence(name=algorithm, family=family, version=algorithm_version or "0")
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(label_names[value])[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
        )
        for number, value in enumerate(values, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name=algorithm,
        software_versions=medseg.__version__,
        device_serial_number="0",
        series_description=series_description,
        omit_empty_frames=False,
    )
    path = Path(path)
    return atomic_write(path, lambda tmp: seg.save_as(tmp))
