"""The SAM server's side of image transport: base64 in, PNG out. Decoding is the client's one
loader (`rescue.images`: format allow-list, size from the header, EXIF orientation, mode
conversion), so the server's pixels, and their digest, are the client's."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image

from rescue.images import ImageError


def decode_b64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("corrupt", "image.b64", f"not valid base64: {exc}") from exc


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG of RGB pixels (what a client sends so the server's digest equals its own;
    no EXIF, so the server's orientation step leaves it as it is)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(buf, format="PNG",
                                                                             compress_level=1)
    return buf.getvalue()
