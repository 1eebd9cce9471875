"""Class 8: memory stays bounded by design. A tiny file announcing gigabytes is refused before anything is
allocated (the announced voxels are checked against what the data file can hold: deflate expands at most 1032:1),
a detached header cannot point the reader at ``/dev/zero``, and no image is resampled to a model grid that would
not fit. Property test: mutated NIfTI headers are refused with a code, within a small allocation budget."""

from __future__ import annotations

import gzip
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from adversarial_helpers import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from medseg.errors import InputError, MedsegError
from medseg.io.nifti import read_nifti
from medseg.io.sitk_formats import read_sitk

LIMIT = 2_000_000_000  # address space of the child process reading a bomb: less than any bomb announces


def _read_limited(path: Path) -> tuple[str, str]:
    """Reads ``path`` with medseg's reader in a child process under a 2 GB address-space limit: (code, stderr)."""
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT}))
        from medseg.io.readers import read_volume
        from medseg.errors import MedsegError
        try:
            read_volume({str(path)!r})
            print("READ")
        except MedsegError as exc:
            print(exc.code)
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    return done.stdout.strip(), done.stderr


def _header(shape, dtype=np.int16) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4), code=1)
    return header.binaryblock + b"\0" * 4


def test_a_kilobyte_gzip_announcing_gigabytes_is_refused_before_allocating(tmp_path: Path):
    bomb = tmp_path / "bomb.nii.gz"
    with gzip.open(bomb, "wb") as fh:
        fh.write(_header((2000, 2000, 1000)) + b"\0" * 600)  # 7.5 GB of int16 announced, 1 KB on disk
    assert bomb.stat().st_size < 1100
    code, err = _read_limited(bomb)
    assert code == "NIFTI_CORRUPT", err[-2000:]
    raw = tmp_path / "bomb.nii"
    raw.write_bytes(_header((2000, 2000, 1000)) + b"\0" * 600)
    assert _read_limited(raw)[0] == "NIFTI_CORRUPT"


def test_detached_headers_cannot_point_at_devices_or_short_files(tmp_path: Path):
    nhdr = tmp_path / "zero.nhdr"
    nhdr.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 2048 2048 1024\nendian: little\nencoding: raw\n"
                    "data file: /dev/zero\n\n")
    assert _read_limited(nhdr)[0] == "INPUT_UNREADABLE"
    mhd = tmp_path / "short.mhd"
    (tmp_path / "short.raw").write_bytes(b"\0" * 100)
    mhd.write_text("ObjectType = Image\nNDims = 3\nDimSize = 1024 1024 512\nElementType = MET_SHORT\n"
                   "ElementDataFile = short.raw\n")
    assert _read_limited(mhd)[0] == "IMAGE_CORRUPT"
    listed = tmp_path / "list.nhdr"
    listed.write_text("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 2\nencoding: raw\ndata file: LIST\n"
                      "a.raw\n/dev/urandom\n")
    (tmp_path / "a.raw").write_bytes(b"\0" * 16)
    with pytest.raises(InputError) as info:
        read_sitk(listed)
    assert info.value.code == "INPUT_UNREADABLE"
    gz = tmp_path / "gz.nhdr"
    gz.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 1024 1024 512\nendian: little\nencoding: gzip\n"
                  "data file: tiny.raw.gz\n\n")
    (tmp_path / "tiny.raw.gz").write_bytes(gzip.compress(b"\0" * 1000))
    with pytest.raises(InputError) as info:
        read_sitk(gz)
    assert info.value.code == "IMAGE_CORRUPT"


def test_a_good_detached_header_still_reads(tmp_path: Path):
    import SimpleITK as sitk

    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(6, 5, 4)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "ok.nhdr"))
    assert read_sitk(tmp_path / "ok.nhdr").spatial_shape == (4, 5, 6)


def test_resampling_to_an_absurd_grid_is_refused(tmp_path: Path, smoke_model: Path):
    from medseg.inference.predictor import Predictor
    from medseg.io.volume import Volume

    predictor = Predictor.from_model_dir(smoke_model, "cpu", tta=False)
    volume = Volume(np.zeros((1, 8, 8, 8), np.int16), np.diag([1000.0, 1000.0, 1000.0, 1.0]))
    tracemalloc.start()
    with pytest.raises(MedsegError) as info:
        predictor.predict(volume)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert info.value.code == "MODEL_GRID_TOO_LARGE" and peak < 200e6


SHAPES = st.tuples(st.integers(1, 32767), st.integers(1, 32767), st.integers(1, 3000))
DTYPES = st.sampled_from([np.uint8, np.int16, np.float32, np.float64, np.complex64, np.int64])


@fuzz_settings(120)
@given(shape=SHAPES, dtype=DTYPES, body=st.binary(max_size=2000), gz=st.booleans(),
       flips=st.lists(st.tuples(st.integers(0, 347), st.integers(0, 255)), max_size=6))
def test_mutated_nifti_headers_are_refused_with_a_code_in_bounded_memory(tmp_path_factory, shape, dtype, body, gz, flips):
    block = bytearray(_header(shape, dtype))
    block[40:42] = (3).to_bytes(2, "little")  # dim[0] = 3
    for offset, value in flips:
        block[offset] = value
    path = tmp_path_factory.mktemp("nii") / ("x.nii.gz" if gz else "x.nii")
    data = bytes(block) + body
    path.write_bytes(gzip.compress(data) if gz else data)
    tracemalloc.start()
    try:
        read_nifti(path)
    except MedsegError as exc:
        assert exc.code in {"NIFTI_CORRUPT", "SHAPE_INVALID", "IMAGE_TOO_LARGE", "IMAGE_DTYPE_UNSUPPORTED",
                            "AFFINE_SHEARED", "AFFINE_NONFINITE", "NIFTI_NONFINITE", "INPUT_UNREADABLE"}, exc.code
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64e6, peak  # at most what the file itself can hold, never what a header announces
