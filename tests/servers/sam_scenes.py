"""Synthetic scenes for the SAM server tests: flat coloured shapes on a noise background, with
exact masks, so a segmentation can be scored against the truth."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Shape:
    name: str
    mask: np.ndarray  # (H, W) bool
    box: tuple[float, float, float, float]  # tight, exclusive max edge
    centre: tuple[float, float]


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    shapes: tuple[Shape, ...]


def _shape(name: str, mask: np.ndarray) -> Shape:
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    # a point surely inside: the pixel farthest from the border of the shape
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return Shape(name=name, mask=mask, box=box, centre=(float(x), float(y)))


def make_scene(seed: int, height: int = 240, width: int = 320) -> Scene:
    """Three non-overlapping shapes (rectangle, ellipse, triangle) in saturated colours on
    mid-grey uniform noise; shape pixels get mild noise too so GrabCut sees texture."""
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 140, size=(height, width, 3), dtype=np.uint8)
    palette = [(230, 40, 40), (40, 200, 60), (50, 70, 235), (240, 220, 40)]
    colours = [palette[i] for i in rng.permutation(len(palette))[:3]]
    cells = [(0, 0), (0, width // 2), (height // 2, width // 4)]
    ch, cw = height // 2, width // 2
    shapes = []
    for kind, (oy, ox), colour in zip(("rectangle", "ellipse", "triangle"), cells, colours,
                                      strict=True):
        canvas = np.zeros((height, width), np.uint8)
        h = int(rng.integers(ch // 2, ch - 16))
        w = int(rng.integers(cw // 2, cw - 16))
        y0 = oy + int(rng.integers(6, ch - h - 6))
        x0 = ox + int(rng.integers(6, cw - w - 6))
        if kind == "rectangle":
            cv2.rectangle(canvas, (x0, y0), (x0 + w - 1, y0 + h - 1), 1, -1)
        elif kind == "ellipse":
            cv2.ellipse(canvas, (x0 + w // 2, y0 + h // 2), (w // 2, h // 2), 0, 0, 360, 1, -1)
        else:
            pts = np.array([[x0, y0 + h - 1], [x0 + w - 1, y0 + h - 1], [x0 + w // 2, y0]])
            cv2.fillPoly(canvas, [pts.astype(np.int32)], 1)
        mask = canvas.astype(bool)
        noise = rng.integers(-12, 13, size=(int(mask.sum()), 3))
        image[mask] = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
        shapes.append(_shape(kind, mask))
    return Scene(image=image, shapes=tuple(shapes))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def padded_box(box: tuple[float, float, float, float], pad: float, width: int, height: int
               ) -> list[float]:
    """The box grown by `pad` of its size on each side (a planner's box is rarely tight)."""
    x1, y1, x2, y2 = box
    dx, dy = pad * (x2 - x1), pad * (y2 - y1)
    return [max(0.0, x1 - dx), max(0.0, y1 - dy), min(float(width), x2 + dx),
            min(float(height), y2 + dy)]
