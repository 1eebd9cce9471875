"""DICOM pixel reading: native little-endian data straight from the file offset, everything else through
pydicom's decoders (pylibjpeg plugins for JPEG / JPEG-LS / JPEG 2000, built-in RLE and deflate), with a
preflight check that names the plugin to install.
"""

from __future__ import annotations

import numpy as np

from medseg.errors import InputError, describe
from medseg.io.dicom_headers import NATIVE_LITTLE_ENDIAN, DicomFile, scrub

# the pylibjpeg plugin that decodes each family of compressed transfer syntaxes (medseg depends on all of them)
PLUGINS = {"JPEG 2000": "pylibjpeg-openjpeg", "JPEG-LS": "pylibjpeg-libjpeg", "JPEG": "pylibjpeg-libjpeg",
           "RLE": "pylibjpeg-rle"}


def check_decodable(f: DicomFile) -> None:
    """Preflight of one file before any pixel buffer is allocated: a decoder exists and is installed, and native
    pixel data is as long as the header announces (element length and file size against rows x columns x
    frames x bytes per sample).

    Raises:
        InputError: ``DICOM_TRUNCATED``, ``DICOM_TRANSFER_SYNTAX_UNSUPPORTED``, ``DICOM_DECODER_MISSING``.
    """
    from pydicom.pixels import get_decoder

    if f.transfer_syntax in NATIVE_LITTLE_ENDIAN:
        if f.pixel_offset is not None and native_dtype(f) is not None:  # read with one readinto (else pydicom)
            expected = f.expected_bytes
            on_disk = max(0, f.path.stat().st_size - int(f.pixel_offset))
            got = min(on_disk, f.pixel_length if f.pixel_length is not None else on_disk)
            if got < expected:
                raise InputError(
                    "DICOM_TRUNCATED", f"{f.label}: pixel data has {got} bytes, expected {expected}",
                    "the file was cut short; re-copy or re-export it",
                )
        return
    try:
        decoder = get_decoder(f.transfer_syntax)
    except (NotImplementedError, ValueError):
        raise InputError(
            "DICOM_TRANSFER_SYNTAX_UNSUPPORTED",
            f"{f.label}: no pixel decoder exists for transfer syntax {f.transfer_syntax}",
        ) from None
    if not decoder.is_available:
        name = decoder.UID.name
        plugin = next((pkg for key, pkg in PLUGINS.items() if key in name), "pylibjpeg-libjpeg")
        raise InputError(
            "DICOM_DECODER_MISSING",
            f"{f.label}: transfer syntax {name} needs a decoder plugin that is not installed",
            f"pip install pylibjpeg {plugin} (or one of: {'; '.join(decoder.missing_dependencies)})",
        )


def _read_native_into(f: DicomFile, out: np.ndarray) -> None:
    """One ``readinto`` of a native file's stored values into the C-contiguous ``out`` (of the stored dtype),
    with the truncation check and sign extension of the stored bits."""
    expected = f.expected_bytes
    with open(f.path, "rb") as fh:
        fh.seek(int(f.pixel_offset))  # type: ignore[arg-type]
        got = fh.readinto(out.reshape(-1).data.cast("B"))
    if got < expected or (f.pixel_length or 0) < expected:
        raise InputError(
            "DICOM_TRUNCATED", f"{f.label}: pixel data has {min(got, f.pixel_length or 0)} bytes, expected {expected}",
            "the file was cut short; re-copy or re-export it",
        )
    if f.signed and f.bits_stored < f.bits_allocated:
        shift = f.bits_allocated - f.bits_stored
        np.left_shift(out, shift, out=out)
        np.right_shift(out, shift, out=out)  # sign-extend the stored bits


def _decoded(f: DicomFile) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(f.path)
        arr = ds.pixel_array
    except (ValueError, EOFError, OSError, RuntimeError, NotImplementedError, AttributeError, KeyError) as exc:
        text = describe(exc, f.path, limit=200)
        code = "DICOM_TRUNCATED" if "less than expected" in text or "truncat" in text.lower() else "DICOM_DECODE_FAILED"
        raise InputError(code, f"{f.label}: cannot decode pixel data: {scrub(text, f.path)}") from None
    arr = np.asarray(arr)
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)  # big-endian sources become native
    if f.frames == 1:
        arr = arr[None]
    return arr


def native_dtype(f: DicomFile) -> np.dtype | None:
    """The stored dtype when the file's pixels can be read straight from disk (native little endian, one
    sample, 8/16/32 bits), else None."""
    if f.pixel_offset is None or f.bits_allocated not in (8, 16, 32) or f.samples != 1:
        return None
    return np.dtype(f"<{'i' if f.signed else 'u'}{f.bits_allocated // 8}")


def read_frame_into(f: DicomFile, out: np.ndarray) -> None:
    """Reads a single-frame file's stored values into ``out`` ``(rows, columns[, samples])``: one ``readinto``
    from the file offset for native data of ``out``'s dtype, pydicom's decoders otherwise.

    Raises:
        InputError: as :func:`read_pixels`.
    """
    dtype = native_dtype(f)
    if dtype is None or dtype != out.dtype or not out.flags.c_contiguous:
        out[...] = read_pixels(f)[0].reshape(out.shape)
        return
    _read_native_into(f, out)  # native data: always decodable


def read_pixels(f: DicomFile) -> np.ndarray:
    """Raw stored values of a file: ``(frames, rows, columns[, samples])``.

    Raises:
        InputError: ``DICOM_TRUNCATED``, ``DICOM_DECODER_MISSING``, ``DICOM_DECODE_FAILED``.
    """
    check_decodable(f)
    dtype = native_dtype(f)
    if dtype is None:
        return _decoded(f)
    out = np.empty((f.frames, f.rows, f.columns), dtype=dtype)
    _read_native_into(f, out)
    return out


def rescale_dtype(slopes: np.ndarray, intercepts: np.ndarray, lo: float, hi: float) -> np.dtype:
    """int16/int32 when every slope is 1, intercepts are whole and the rescaled range ``[lo, hi]`` of the stored
    values fits; float32 otherwise."""
    if np.all(slopes == 1.0) and np.all(intercepts == np.round(intercepts)):
        lo, hi = lo + float(intercepts.min()), hi + float(intercepts.max())
        for candidate in (np.int16, np.int32):
            info = np.iinfo(candidate)
            if info.min <= lo and hi <= info.max:
                return np.dtype(candidate)
    return np.dtype(np.float32)
