"""Annotation geometry to pixel masks: labelme shapes (ReasonSeg) and COCO segmentations (RefCOCO).

Each format is rasterised the way the field's reference code does it, because the pixel
convention changes the numbers: LISA draws labelme polygons with OpenCV (outline plus fill, so a
rectangle with corners x0..x1 covers columns x0..x1 inclusive), while COCO polygons go through
pycocotools (the same rectangle covers x0..x1-1). Malformed input raises `AnnotationError`
naming what is wrong; loaders turn it into a `SampleError` with the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from rescue.sample import IGNORE


class AnnotationError(ValueError):
    """An annotation cannot be turned into a mask."""


# --------------------------------------------------------------------------------------------
# labelme (ReasonSeg)


def _labelme_points(shape: Any, k: int) -> np.ndarray:
    if not isinstance(shape, Mapping):
        raise AnnotationError(f"shapes[{k}] is {type(shape).__name__}, not an object")
    if not isinstance(shape.get("label"), str):
        raise AnnotationError(f"shapes[{k}] has no string 'label'")
    pts = shape.get("points")
    try:
        arr = np.asarray(pts, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise AnnotationError(f"shapes[{k}].points is not a list of [x, y] pairs") from e
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise AnnotationError(f"shapes[{k}].points must be a non-empty list of [x, y] pairs, "
                              f"got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise AnnotationError(f"shapes[{k}].points has a non-finite coordinate")
    # LISA passes the points through np.int32, which truncates toward zero.
    return arr.astype(np.int32)


def _draw_labelme(canvas: np.ndarray, pts: np.ndarray, value: int) -> None:
    poly = pts[None]  # one polygon
    cv2.polylines(canvas, poly, True, value, 1)
    cv2.fillPoly(canvas, poly, value)


def labelme_mask(shapes: Any, height: int, width: int) -> np.ndarray:
    """ReasonSeg ground truth from labelme `shapes`, following LISA's `get_mask_from_json`.

    Shapes labelled "flag" (case-insensitive) are skipped; a label containing "ignore" paints
    `IGNORE` (255), any other label paints 1. Every shape is a polygon whatever its `shape_type`
    (as in LISA). Shapes are painted largest first so a small shape inside a large one (an
    ignore hole in a target, or the reverse) stays visible; equal areas keep LISA's order.
    """
    if not isinstance(shapes, list):
        raise AnnotationError(f"'shapes' must be a list, got {type(shapes).__name__}")
    drawn: list[tuple[np.ndarray, int]] = []
    areas: list[int] = []
    for k, shape in enumerate(shapes):
        pts = _labelme_points(shape, k)
        label = shape["label"].lower()
        if label == "flag":
            continue
        value = IGNORE if "ignore" in label else 1
        tmp = np.zeros((height, width), dtype=np.uint8)
        _draw_labelme(tmp, pts, 1)
        areas.append(int(tmp.sum()))
        drawn.append((pts, value))
    # LISA: np.argsort(areas)[::-1]; numpy sorts these short lists stably, then reverses.
    order = np.argsort(np.asarray(areas, dtype=np.int64), kind="stable")[::-1]
    mask = np.zeros((height, width), dtype=np.uint8)
    for i in order:
        pts, value = drawn[int(i)]
        _draw_labelme(mask, pts, value)
    return mask


# --------------------------------------------------------------------------------------------
# COCO segmentation (RefCOCO family)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _polygon_rle(poly: Sequence[Any], k: int, height: int, width: int) -> dict | None:
    if not all(_is_number(v) for v in poly):
        raise AnnotationError(f"polygon {k} has a non-numeric coordinate")
    if len(poly) % 2:
        raise AnnotationError(f"polygon {k} has an odd number of coordinates ({len(poly)})")
    coords = [float(v) for v in poly]
    if not all(np.isfinite(coords)):
        raise AnnotationError(f"polygon {k} has a non-finite coordinate")
    if len(coords) < 6:
        # Fewer than 3 points encloses no area; pycocotools would also misread 4 values as a box.
        return None
    return mask_utils.frPyObjects([coords], height, width)[0]


def _rle_obj(rle: Mapping[str, Any], height: int, width: int) -> dict:
    size = rle.get("size")
    counts = rle.get("counts")
    if (not isinstance(size, Sequence) or len(size) != 2
            or [int(s) for s in size] != [height, width]):
        raise AnnotationError(f"RLE size {size!r} does not match the image ({height}, {width})")
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    if isinstance(counts, str):
        return {"size": [height, width], "counts": counts.encode("ascii")}
    if isinstance(counts, bytes):
        return {"size": [height, width], "counts": counts}
    raise AnnotationError(f"RLE counts must be a string or a list, got {type(counts).__name__}")


def coco_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Boolean (H, W) mask of a COCO `segmentation`: the union of its parts.

    Accepts a list of polygons (each a flat [x1, y1, x2, y2, ...] list), a single flat polygon
    (some Hugging Face copies store one), an RLE dict (compressed string/bytes or uncompressed
    counts), a list of RLE dicts, or any of these as a JSON string. Holes come from RLE; several
    polygon parts are united as LISA does (it sums the decoded parts). An empty list gives an
    empty mask (LISA scores such a ref against an empty target).
    """
    seg = segmentation
    if isinstance(seg, str | bytes):
        try:
            seg = json.loads(seg)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"segmentation is a string but not JSON: {e}") from e
    if isinstance(seg, np.ndarray):
        seg = seg.tolist()
    out = np.zeros((height, width), dtype=bool)
    if isinstance(seg, Mapping):
        parts: list[Any] = [seg]
    elif isinstance(seg, list | tuple):
        parts = list(seg)
        if parts and all(_is_number(v) for v in parts):
            parts = [parts]  # one flat polygon
    else:
        raise AnnotationError(f"segmentation must be polygons or RLE, got {type(seg).__name__}")
    for k, part in enumerate(parts):
        if isinstance(part, np.ndarray):
            part = part.tolist()
        if isinstance(part, Mapping):
            rle = _rle_obj(part, height, width)
        elif isinstance(part, list | tuple):
            rle = _polygon_rle(part, k, height, width)
            if rle is None:
                continue
        else:
            raise AnnotationError(f"segmentation part {k} is {type(part).__name__}, "
                                  "not a polygon or an RLE")
        try:
            out |= mask_utils.decode(rle).astype(bool)
        except Exception as e:  # pycocotools raises bare errors on corrupt counts
            raise AnnotationError(f"segmentation part {k} cannot be decoded: {e}") from e
    return out
