"""Image decoding shared by the dataset loaders.

Decoded with OpenCV as LISA's evaluation does (`cv2.imread`, then BGR to RGB): the same EXIF
rotation and grayscale/CMYK handling as the reference, so masks drawn on those pixels line up.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from rescue.datasets.base import SampleError


def decode_image(data: bytes, what: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB from encoded bytes; `what` names the source in errors."""
    if not data:
        raise SampleError(f"{what}: image is empty")
    buf = np.frombuffer(data, dtype=np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raise SampleError(f"{what}: image cannot be decoded (corrupt or not an image)")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def read_image(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise SampleError(f"image missing: {path}") from e
    except OSError as e:
        raise SampleError(f"image unreadable: {path}: {e}") from e
    return decode_image(data, str(path))
