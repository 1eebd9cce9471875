"""2D images (PNG, JPEG, TIFF; grey or RGB) as :class:`Volume` ``(C, X, Y)``.

X is the row index and Y the column index of the picture, so ``array[c]`` displays as stored. Photos carry
no geometry: the affine is the identity (1 mm pixels) unless the caller knows better.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medseg.errors import InputError, describe, require_file
from medseg.io.volume import MAX_VOLUME_BYTES, Volume, check_allocation, check_voxel_dtype

IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def is_image2d(path: Path) -> bool:
    """True for the 2D picture file endings medseg reads."""
    return path.suffix.lower() in IMAGE_2D_SUFFIXES


def read_image2d(path: str | Path) -> Volume:
    """Reads a grey or RGB picture.

    Returns:
        ``(1, X, Y)`` for grey, ``(3, X, Y)`` for colour (alpha dropped); dtype as stored.

    Raises:
        InputError: ``PATH_NOT_FOUND``; ``IMAGE_CORRUPT`` when the file cannot be decoded; ``IMAGE_TOO_LARGE``
            when its header announces more than ``MAX_VOLUME_BYTES`` (checked before decoding).
    """
    path = require_file(path, "image")
    try:
        with Image.open(path) as img:
            width, height = img.size
            nbytes = width * height * max(len(img.getbands()), 1) * (2 if img.mode.startswith("I;16") else 4 if img.mode in ("I", "F") else 1)
            check_allocation(nbytes, f"{path.name} ({width}x{height} pixels)", MAX_VOLUME_BYTES)
            decoded: Image.Image = img
            if img.mode in ("RGBA", "P", "CMYK", "LA"):
                decoded = img.convert("RGB" if img.mode != "LA" else "L")
            data = np.asarray(decoded)
    except Image.DecompressionBombError as exc:
        raise InputError("IMAGE_TOO_LARGE", f"{path.name}: {describe(exc, path)}", "refused before decoding") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError("IMAGE_CORRUPT", f"cannot decode {path.name}: {describe(exc, path)}") from None
    check_voxel_dtype(data.dtype, path.name)
    array = data[None] if data.ndim == 2 else np.moveaxis(data[..., :3], -1, 0)
    return Volume(np.ascontiguousarray(array), np.eye(4), {"source_format": path.suffix.lower().lstrip(".")})
