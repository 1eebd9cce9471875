"""Reading every output the way its format stores text, for the patient-data canary tests: gzip and zip members
(.nii.gz, .npz, .pt), PNG text chunks, inflated PDF streams."""

from __future__ import annotations

import gzip
import io
import re
import struct
import zipfile
import zlib
from pathlib import Path


def _png_texts(data: bytes) -> bytes:
    out, pos = b"", 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt":
            out += body
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\0")
            out += key + zlib.decompress(rest[1:])
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            compressed, rest = rest[0], rest[2:]
            lang, _, rest = rest.partition(b"\0")
            translated, _, text = rest.partition(b"\0")
            out += key + lang + translated + (zlib.decompress(text) if compressed else text)
        pos += 12 + length
    return out


def _pdf_streams(data: bytes) -> bytes:
    """Inflated content streams, plus the text of each BT..ET block with its kerned pieces joined
    (``[(c) -0.2 (a) ...] TJ``)."""
    out = b""
    for match in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
        try:
            stream = zlib.decompress(match.group(1))
        except zlib.error:
            stream = match.group(1)
        out += stream
        for block in re.findall(rb"BT(.*?)ET", stream, re.S):
            out += b"\n" + b"".join(re.findall(rb"\(((?:[^()\\]|\\.)*)\)", block))
    return out


def decoded(path: Path) -> bytes:
    """The file's bytes plus what its format compresses or encodes."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data += gzip.decompress(data)
    if data[:4] == b"PK\x03\x04":  # .npz, torch .pt
        with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as archive:
            for name in archive.namelist():
                data += name.encode() + archive.read(name)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        data += _png_texts(data)
    if data[:5] == b"%PDF-":
        data += _pdf_streams(data)
    return data


def leaks(root: Path, canaries: list[str], texts: list[str] = ()) -> list[str]:
    """Where any of ``canaries`` (case-insensitive) occurs: file and folder names under ``root``, file contents as
    :func:`decoded` reads them, and ``texts`` (console output, log lines)."""
    found = []
    lowered = [c.lower() for c in canaries]
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root)).lower()
        found += [f"file name {path.relative_to(root)}" for c in lowered if c in rel]
        if path.is_file() and not path.is_symlink():
            data = decoded(path).lower()
            found += [f"content of {path.relative_to(root)}: {c}" for c in lowered
                      if c.encode() in data or c.encode("utf-16-le") in data]
    for i, text in enumerate(texts):
        found += [f"text #{i}: {c}" for c in lowered if c in text.lower()]
    return found
