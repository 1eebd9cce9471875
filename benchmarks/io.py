"""Image I/O speed against SimpleITK, measured in one run on the same data.

    .venv/bin/python benchmarks/io.py [--slices 300] [--size 512] [--repeats 3]

* DICOM series load: medseg ``read_dicom(folder)`` (recursive header scan, grouping, sorting, validation, pixels,
  rescale) vs SimpleITK's ``ImageSeriesReader`` given the file names already sorted (its fastest use: no scan,
  no validation). Target: ratio <= 1.5.
* NIfTI ``.nii.gz`` read: medseg ``read_nifti`` (whole-stream gzip CRC check, NaN/Inf check, shear check) vs
  ``SimpleITK.ReadImage``. Target: ratio <= 1.5.
* NIfTI ``.nii.gz`` write: medseg ``write_nifti`` (atomic, fsync) vs SimpleITK writing with gzip level 1.
  Target: ratio <= 1.0 ("gzip level 1 speed or better").

The volume is CT-like (a body ellipse with organs and noise, int16 HU), so it compresses like a real scan.
Times are the median of ``--repeats`` runs after one warm-up run (files in the page cache for both readers).
Ratios are medseg time / SimpleITK time (below 1 = medseg faster).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_time, save

from medseg.io.dicom import read_dicom
from medseg.io.dicom_write import write_dicom_series
from medseg.io.nifti import read_nifti, write_nifti
from medseg.io.volume import Volume


def ct_like(size: int, slices: int, seed: int = 0) -> Volume:
    """int16 HU volume: air outside an elliptical body, soft tissue, two organs, bone ring, noise."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    organ = ((x - 0.3) / 0.25) ** 2 + ((y + 0.1) / 0.2) ** 2 < 1
    bone = np.abs(np.hypot(x / 0.8, y / 0.6) - 0.9) < 0.03
    plane = np.where(body, 40, -1000) + organ * 60 + bone * 700
    array = np.empty((1, size, size, slices), np.int16)
    for k in range(slices):
        array[0, :, :, k] = plane + rng.normal(0, 12, plane.shape) * body
    affine = np.diag([0.7, 0.7, 1.25, 1.0])
    affine[:3, 3] = [-180.0, -180.0, -300.0]
    return Volume(array, affine)


def main() -> None:
    import SimpleITK as sitk

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    volume = ct_like(args.size, args.slices)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        files = write_dicom_series(volume, tmp_path / "dicom", rescale_intercept=-1024.0)
        names = [str(f) for f in files]  # already in slice order

        def medseg_dicom() -> None:
            read_dicom(tmp_path / "dicom")

        def sitk_dicom() -> None:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(names)
            reader.Execute()

        check = read_dicom(tmp_path / "dicom")
        assert np.array_equal(check.array, volume.array), "medseg read the series wrongly"
        ref = sitk.GetArrayFromImage(sitk.ReadImage(names))
        assert np.array_equal(ref.transpose(2, 1, 0), volume.array[0]), "SimpleITK read the series wrongly"
        dicom = {
            "medseg_s": median_time(medseg_dicom, args.repeats),
            "simpleitk_sorted_names_s": median_time(sitk_dicom, args.repeats),
        }
        dicom["ratio"] = dicom["medseg_s"] / dicom["simpleitk_sorted_names_s"]

        nii = tmp_path / "ct.nii.gz"
        write_nifti(volume, nii)
        read_time = {
            "medseg_s": median_time(lambda: read_nifti(nii), args.repeats),
            "simpleitk_s": median_time(lambda: sitk.ReadImage(str(nii)), args.repeats),
        }
        read_time["ratio"] = read_time["medseg_s"] / read_time["simpleitk_s"]

        image = sitk.ReadImage(str(nii))
        write_time = {
            "medseg_s": median_time(lambda: write_nifti(volume, tmp_path / "out.nii.gz"), args.repeats),
            "simpleitk_gzip_level1_s": median_time(
                lambda: sitk.WriteImage(image, str(tmp_path / "sitk.nii.gz"), True, 1), args.repeats
            ),
        }
        write_time["ratio"] = write_time["medseg_s"] / write_time["simpleitk_gzip_level1_s"]
        sizes = {
            "medseg_MB": round((tmp_path / "out.nii.gz").stat().st_size / 1e6, 1),
            "simpleitk_level1_MB": round((tmp_path / "sitk.nii.gz").stat().st_size / 1e6, 1),
        }
    save(
        "io",
        {
            "volume": {"shape": list(volume.spatial_shape), "dtype": "int16", "raw_MB": round(volume.array.nbytes / 1e6, 1)},
            "repeats": args.repeats,
            "dicom_series_read": {**dicom, "target_ratio_max": 1.5},
            "nifti_gz_read": {**read_time, "target_ratio_max": 1.5},
            "nifti_gz_write": {**write_time, **sizes, "target_ratio_max": 1.0},
        },
    )


if __name__ == "__main__":
    main()
