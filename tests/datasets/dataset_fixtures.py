"""Fixture builders for the dataset tests: tiny images and annotations in each exact layout.

Ground truth is drawn independently of the loaders, from axis-aligned rectangles whose pixels
are known exactly under each format's convention (OpenCV/labelme: both corners inclusive;
pycocotools polygons: the far edges exclusive).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np


def noise_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def write_jpg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def rect_points(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    """labelme polygon of a rectangle (corner points)."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def coco_rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """Flat COCO polygon of a rectangle; pycocotools fills columns x0..x1-1, rows y0..y1-1."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def box_truth(shape: tuple[int, int], *boxes: tuple[int, int, int, int],
              value: int = 1, base: np.ndarray | None = None,
              inclusive: bool = True) -> np.ndarray:
    """Paint rectangles (x0, y0, x1, y1) into a copy of `base` by slicing."""
    out = np.zeros(shape, np.uint8) if base is None else base.copy()
    e = 1 if inclusive else 0
    for x0, y0, x1, y1 in boxes:
        out[y0:y1 + e, x0:x1 + e] = value
    return out


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
