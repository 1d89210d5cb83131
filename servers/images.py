"""Image bytes in, (H, W, 3) uint8 RGB pixels out, with the size checked before decoding."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
"""The only formats Pillow may decode here: any other plugin is attack surface for no use (an
EPS upload would reach Ghostscript)."""


class ImageInvalid(ValueError):
    """The bytes are not base64, or not an image in one of `FORMATS` that Pillow can decode."""


class ImageTooLarge(ValueError):
    """Over the server's limits; width/height None when Pillow refused it before we could look."""

    def __init__(self, width: int | None, height: int | None, limit_pixels: int,
                 limit_side: int, why: str = "") -> None:
        size = f"{width}x{height} = {width * height} px" if width and height else why
        super().__init__(f"image is {size}; limits: {limit_pixels} px and {limit_side} px a side")
        self.width, self.height = width, height
        self.limit_pixels, self.limit_side = limit_pixels, limit_side


def decode_b64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInvalid(f"image.b64 is not valid base64: {exc}") from exc


def decode_image(raw: bytes, max_pixels: int, max_side: int) -> np.ndarray:
    """Decode to RGB, trying only `FORMATS`. The header's size is checked before the pixels
    are decompressed, so a decompression bomb costs nothing. EXIF orientation is not applied:
    the client's pixels are the file's pixels, and their digest must match what the client
    computes."""
    if not raw:
        raise ImageInvalid("image is empty")
    try:
        img = Image.open(io.BytesIO(raw), formats=FORMATS)
        width, height = img.size
        if width * height > max_pixels or max(width, height) > max_side:
            raise ImageTooLarge(width, height, max_pixels, max_side)
        img.load()
        rgb = img.convert("RGB")
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard, far past any limit
        raise ImageTooLarge(None, None, max_pixels, max_side, str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageInvalid(f"cannot decode image: not {', '.join(FORMATS)} ({exc})") from exc
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise ImageInvalid(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageInvalid(f"decoded image has shape {arr.shape}, expected (H, W, 3)")
    return np.ascontiguousarray(arr)


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG of RGB pixels (what a client sends so the server's digest equals its own)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(buf, format="PNG",
                                                                             compress_level=1)
    return buf.getvalue()
