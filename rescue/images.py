"""The one image loader: encoded bytes or a file in, (H, W, 3) uint8 RGB pixels out.

Every image the client or the SAM server decodes comes through here, so they agree on pixels
and on what they refuse:
- only PNG, JPEG, WebP, BMP and TIFF, recognised from the header's magic bytes, each opened
  with its own Pillow plugin and no other (an EPS upload must never reach Ghostscript);
- the size read from the header is checked against `ImageLimits` before any pixel is
  decompressed, so a decompression bomb costs nothing. `Image.open` is not used: its guard is a
  process-wide limit that warns through `warnings` or raises its own error (only a TIFF's load
  still asks it, with the size already checked here; what it raises is wrapped);
- EXIF orientation is applied: the pixels are the image as displayed (OpenCV's `imread` does
  the same, so dataset masks line up as in LISA's evaluation);
- 16-bit greyscale is scaled to 8 bits (the high byte, as OpenCV does), not clipped;
  transparency (palette, LA, RGBA) is composited over white; CMYK goes through Pillow's
  conversion (Adobe's inverted CMYK included);
- every refusal is one `ImageError`, whose message starts with a stable `image:<code>`.

For an ordinary 8-bit RGB or greyscale JPEG or PNG the pixels equal OpenCV's `imdecode` (the
LISA golden test pins that).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import (
    BmpImagePlugin,
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from rescue.datasets.base import SampleError
from rescue.errors import UserError

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
"""The only formats decoded; anything else Pillow knows is attack surface for no use."""

_PLUGINS: dict[str, type[ImageFile.ImageFile]] = {
    "PNG": PngImagePlugin.PngImageFile, "JPEG": JpegImagePlugin.JpegImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile, "BMP": BmpImagePlugin.BmpImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
}
_GREY16 = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")
_TO_RGB = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")
WHITE = 255

CODES = ("empty", "unsupported", "corrupt", "too_large", "missing", "unreadable")
"""The `image:<code>` reasons an `ImageError` carries."""


@dataclass(frozen=True)
class ImageLimits:
    """The largest image decoded; the defaults are the SAM server's."""

    max_pixels: int = 32 * 1024 * 1024
    max_side: int = 8192

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_side < 1:
            raise ValueError(f"image limits must be >= 1, got {self}")


DEFAULT_LIMITS = ImageLimits()


class ImageError(SampleError, UserError):
    """An image that cannot be used: `code` is one of `CODES`, the message reads
    "image:<code> <what>: <detail>". In a benchmark it fails its own sample (a `SampleError`);
    on its own (`mode=infer`) it ends the run in one line (a `UserError`). `width`/`height`
    are the header's, where it was read."""

    def __init__(self, code: str, what: str, detail: str, *, width: int | None = None,
                 height: int | None = None) -> None:
        assert code in CODES, code
        super().__init__(f"image:{code} {what}: {detail}")
        self.code, self.width, self.height = code, width, height

    @property
    def reason(self) -> str:
        return f"image:{self.code}"


def sniff(head: bytes) -> str | None:
    """The allowed format whose magic bytes `head` starts with, else None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    return None


def decode(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, what: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 RGB from encoded bytes, as displayed; `what` names the source in
    errors."""
    return _decoded(data, limits, what, lambda img: _to_rgb(_oriented(img), what))


def decode_plane(data: bytes, limits: ImageLimits = DEFAULT_LIMITS,
                 what: str = "mask") -> np.ndarray:
    """(H, W) values of a mask or label map as stored: no orientation, no scaling, palette
    indices rather than colours, 1-bit as 0/255; a multi-channel image gives its first."""
    def plane(img: Image.Image) -> np.ndarray:
        arr = np.asarray(img.convert("L") if img.mode == "1" else img)
        return np.ascontiguousarray(arr[..., 0] if arr.ndim == 3 else arr)

    return _decoded(data, limits, what, plane)


def _decoded(data: bytes, limits: ImageLimits, what: str,
             pixels: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """`pixels` of the image in `data`, once its format and header size are accepted."""
    if not data:
        raise ImageError("empty", what, "no bytes")
    fmt = sniff(bytes(data[:16]))
    if fmt is None:
        raise ImageError("unsupported", what, f"not {', '.join(FORMATS)} "
                         f"(header {bytes(data[:8])!r})")
    try:
        img = _PLUGINS[fmt](io.BytesIO(data))
    except Exception as exc:  # a plugin raises SyntaxError, OSError, struct.error, ...
        raise ImageError("corrupt", what, f"unreadable {fmt} header "
                         f"({type(exc).__name__}: {exc})") from exc
    with img:
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageError("corrupt", what, f"{fmt} header says {width}x{height}")
        if width * height > limits.max_pixels or max(width, height) > limits.max_side:
            raise ImageError("too_large", what, f"{fmt} of {width}x{height} = {width * height} "
                             f"px; limits: {limits.max_pixels} px and {limits.max_side} px a "
                             "side", width=width, height=height)
        try:
            img.load()
            return pixels(img)
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:  # a TIFF tile past Pillow's own guard
            raise ImageError("too_large", what, str(exc), width=width, height=height) from exc
        except Exception as exc:  # truncated or corrupt data: Pillow raises many types
            raise ImageError("corrupt", what, f"{fmt} cannot be decoded "
                             f"({type(exc).__name__}: {exc})") from exc


def read(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """`decode` of a file's bytes; a missing or unreadable file is an `ImageError` too."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ImageError("missing", str(path), "no such file") from exc
    except OSError as exc:
        raise ImageError("unreadable", str(path), f"{type(exc).__name__}: {exc}") from exc
    return decode(data, limits, str(path))


def _oriented(img: Image.Image) -> Image.Image:
    """The image as displayed. An EXIF block that cannot be parsed counts as no orientation,
    as in OpenCV (the pixels themselves are fine)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def _to_rgb(img: Image.Image, what: str) -> np.ndarray:
    mode = img.mode
    # Pillow before 10.x/11 opened 16-bit grey PNGs as 32-bit "I"; a PNG holds no more than 16
    if mode in _GREY16 or (mode == "I" and img.format == "PNG"):
        grey = (np.asarray(img).astype(np.uint32).clip(0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if mode in _ALPHA or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[..., 3:]
        out = (rgba[..., :3] * alpha + WHITE * (255 - alpha) + 127) // 255
        return np.ascontiguousarray(out.astype(np.uint8))
    if mode not in _TO_RGB:
        raise ImageError("unsupported", what, f"pixel mode {mode} (e.g. 32-bit integer or "
                         "float TIFF) has no defined 8-bit RGB")
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(arr)
