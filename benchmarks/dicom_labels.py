"""RTSTRUCT -> label map at CT size: medseg's reading against plastimatch's, same files, same run.

A 512 x 512 x N axial CT series (0.8 mm pixels, 2.5 mm slices) and a medseg-written structure set of a body outline
on every slice, a liver-sized organ, a ring with a hole (an island inside) and 20 small lesions. Timed: medseg's
index (header scan, ROI matching) + series load + rasterisation of every ROI into one label map, and
``plastimatch convert --referenced-ct`` writing one mask per structure (it reads the series itself). Also the
agreement of the two per ROI (Dice), which the tests check in detail (tests/io/test_dicom_labels_tools.py).

    .venv/bin/python benchmarks/dicom_labels.py [--slices 120]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save

from medseg.io.dicom import load_series, read_dicom
from medseg.io.dicom_labels import index_studies, label_map, label_rules
from medseg.io.dicom_write import write_dicom_series
from medseg.io.readers import read_volume
from medseg.io.rtstruct import write_rtstruct
from medseg.io.volume import Volume

NAMES = {0: "background", 1: "body", 2: "liver", 3: "ring", 4: "lesions"}


def phantom(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, labels) ``(512, 512, n)``: nested structures, drawn in order (later overwrites)."""
    x, y = np.mgrid[:512, :512].astype(np.float32)
    labels = np.zeros((512, 512, n), np.uint8)
    rng = np.random.default_rng(0)
    centres = rng.uniform(150, 360, (20, 3)) * [1, 1, n / 512]
    for z in range(n):
        t = z / max(n - 1, 1)
        body = ((x - 256) / (200 + 20 * np.sin(6 * t))) ** 2 + ((y - 256) / 150) ** 2 < 1
        liver = ((x - 200) / 70) ** 2 + ((y - 230) / (55 + 10 * t)) ** 2 < 1
        r = np.hypot(x - 330, y - 280)
        labels[..., z][body] = 1
        labels[..., z][liver & (z > n // 5)] = 2
        labels[..., z][((r < 30) & (r >= 14)) | (r < 6)] = 3
        for cx, cy, cz in centres:
            labels[..., z][np.hypot(x - cx, y - cy) < 6 - abs(z - cz)] = 4
    image = np.where(labels > 0, 40, -1000).astype(np.int16) + rng.integers(-20, 20, labels.shape, dtype=np.int16)
    return image, labels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return round(2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=120)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        image, labels = phantom(args.slices)
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
        affine[:3, 3] = (-200, -180, -100)
        write_dicom_series(Volume(image[None], affine), tmp / "ct")
        source = read_dicom(tmp / "ct")
        started = time.perf_counter()
        write_rtstruct(source.with_array(labels[None]), source, tmp / "rt.dcm", NAMES)
        write_s = time.perf_counter() - started
        contours = sum(1 for _ in __import__("pydicom").dcmread(tmp / "rt.dcm").ROIContourSequence[0].ContourSequence)

        spec = {name: {"patterns": [f"^{name}$"], "required": False} for value, name in NAMES.items() if value}
        started = time.perf_counter()
        (case,) = index_studies(tmp, label_rules(spec)).cases
        volume = load_series(case.series)
        ours = label_map(case, label_rules(spec), volume)
        medseg_s = time.perf_counter() - started

        started = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "plastimatch"), "convert", "--input", str(tmp / "rt.dcm"),
                        "--referenced-ct", str(tmp / "ct"), "--output-prefix", str(tmp / "pm"), "--prefix-format",
                        "nii.gz"], check=True, capture_output=True)
        plastimatch_s = time.perf_counter() - started
        agreement = {}
        for value, name in NAMES.items():
            if value:
                theirs = read_volume(tmp / "pm" / f"{name}.nii.gz").array[0] > 0
                agreement[name] = {"dice_vs_plastimatch": dice(ours == value, theirs),
                                   "exact_vs_written_mask": bool(((ours == value) == (labels == value)).all())}
    result = {
        "machine": machine(),
        "series": [512, 512, args.slices], "rois": len(NAMES) - 1, "body_contours": contours,
        "medseg_write_rtstruct_s": round(write_s, 2),
        "medseg_read_s": round(medseg_s, 2), "plastimatch_s": round(plastimatch_s, 2),
        "medseg_time_ratio_to_plastimatch": round(medseg_s / plastimatch_s, 3),
        "agreement": agreement,
        "note": "medseg_read_s: header scan + ROI matching + series load + rasterisation of every ROI into one map; "
                "plastimatch_s: plastimatch convert --referenced-ct (its own series read) writing one mask per ROI. "
                "plastimatch fills holes (the ring), medseg applies the even-odd rule.",
    }
    save("dicom_labels", result)


if __name__ == "__main__":
    main()
