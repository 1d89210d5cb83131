"""Synthetic scenes for the SAM server tests: flat coloured shapes on a noise background, with
exact masks, so a segmentation can be scored against the truth. NumPy only (the torch tier runs
where OpenCV may be absent)."""

from __future__ import annotations

from dataclasses import dataclass

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


def _shape(name: str, mask: np.ndarray, inside: tuple[float, float]) -> Shape:
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    assert mask[int(inside[1]), int(inside[0])], "the inner point must be inside the shape"
    return Shape(name=name, mask=mask, box=box, centre=inside)


def _triangle(yy: np.ndarray, xx: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Pixels whose centre lies inside the triangle `pts` (half-plane tests)."""
    px, py = xx + 0.5, yy + 0.5
    signs = []
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True):
        signs.append((x1 - x0) * (py - y0) - (y1 - y0) * (px - x0))
    return (np.stack(signs) >= 0).all(0) | (np.stack(signs) <= 0).all(0)


def make_scene(seed: int, height: int = 240, width: int = 320) -> Scene:
    """Three non-overlapping shapes (rectangle, ellipse, triangle) in saturated colours on
    mid-grey uniform noise; shape pixels get mild noise too so GrabCut sees texture."""
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 140, size=(height, width, 3), dtype=np.uint8)
    palette = [(230, 40, 40), (40, 200, 60), (50, 70, 235), (240, 220, 40)]
    colours = [palette[i] for i in rng.permutation(len(palette))[:3]]
    cells = [(0, 0), (0, width // 2), (height // 2, width // 4)]
    ch, cw = height // 2, width // 2
    yy, xx = np.mgrid[0:height, 0:width]
    shapes = []
    for kind, (oy, ox), colour in zip(("rectangle", "ellipse", "triangle"), cells, colours,
                                      strict=True):
        h = int(rng.integers(ch // 2, ch - 16))
        w = int(rng.integers(cw // 2, cw - 16))
        y0 = oy + int(rng.integers(6, ch - h - 6))
        x0 = ox + int(rng.integers(6, cw - w - 6))
        if kind == "rectangle":
            mask = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
            inside = (x0 + w / 2, y0 + h / 2)
        elif kind == "ellipse":
            cy, cx = y0 + h / 2, x0 + w / 2
            mask = ((yy + 0.5 - cy) / (h / 2)) ** 2 + ((xx + 0.5 - cx) / (w / 2)) ** 2 <= 1
            inside = (cx, cy)
        else:
            pts = [(x0, y0 + h), (x0 + w, y0 + h), (x0 + w / 2, y0)]
            mask = _triangle(yy, xx, pts)
            inside = (x0 + w / 2, y0 + 2 * h / 3)  # the centroid
        noise = rng.integers(-12, 13, size=(int(mask.sum()), 3))
        image[mask] = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
        shapes.append(_shape(kind, mask, (float(int(inside[0])), float(int(inside[1])))))
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
