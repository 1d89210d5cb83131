"""Annotation geometry to pixel masks: labelme shapes (ReasonSeg) and COCO segmentations (RefCOCO).

Each format is rasterised the way the field's reference code does it, because the pixel
convention changes the numbers: LISA draws labelme polygons with OpenCV 4.8 (outline plus fill,
so a rectangle with corners x0..x1 covers columns x0..x1 inclusive), reproduced by
`raster.polygon_mask` whatever OpenCV is installed, while COCO polygons go through pycocotools
(the same rectangle covers x0..x1-1). Malformed input raises `AnnotationError` naming what is
wrong; loaders turn it into a `SampleError` with the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from rescue.datasets.raster import polygon_mask
from rescue.sample import IGNORE

PARTS = ("lisa", "union")
"""How the parts of a COCO segmentation merge (`coco_mask`): LISA's sum, or their union."""


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


def labelme_mask(shapes: Any, height: int, width: int) -> np.ndarray:
    """ReasonSeg ground truth from labelme `shapes`, as LISA's `get_mask_from_json` paints it.

    A shape labelled exactly "flag" (any case) is skipped; "flag_extra" is not. A label
    containing "ignore" paints `IGNORE` (255), any other label 1. Every shape is drawn as the
    closed polygon of its points, outline plus fill by OpenCV 4.8's rules (`raster`), whatever
    its `shape_type`, as in LISA: a 2-point rectangle or circle is the segment between its two
    points, a point is one pixel, a line its segment. Points are truncated toward zero (LISA's
    `np.int32`).

    Shapes are painted largest area first (area: the pixels of the shape alone), so a small
    shape inside a large one stays visible. Equal areas: the later shape in the file is painted
    first, so the earlier one ends on top (a stable sort, reversed). LISA's default
    `np.argsort` agrees wherever at most 16 shapes are painted (numpy 1.24, its pinned version,
    insertion-sorts those); with more, and ties whose order shows, LISA's order is
    implementation-defined (introsort; newer numpy's SIMD sorts differ again even on short
    lists) and ours is this stable one.
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
        areas.append(int(polygon_mask(pts, height, width).sum()))
        drawn.append((pts, IGNORE if "ignore" in label else 1))
    order = np.argsort(np.asarray(areas, dtype=np.int64), kind="stable")[::-1]
    mask = np.zeros((height, width), dtype=np.uint8)
    for i in order:
        pts, value = drawn[int(i)]
        mask[polygon_mask(pts, height, width)] = value  # rasterised again: one H x W at a time
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


def _parts(segmentation: Any) -> list[Any]:
    seg = segmentation
    if isinstance(seg, str | bytes):
        try:
            seg = json.loads(seg)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"segmentation is a string but not JSON: {e}") from e
    if isinstance(seg, np.ndarray):
        seg = seg.tolist()
    if isinstance(seg, Mapping):
        return [seg]
    if isinstance(seg, list | tuple):
        parts = [p.tolist() if isinstance(p, np.ndarray) else p for p in seg]
        if parts and all(_is_number(v) for v in parts):
            return [parts]  # one flat polygon
        return parts
    raise AnnotationError(f"segmentation must be polygons or RLE, got {type(seg).__name__}")


def coco_parts(segmentation: Any, height: int, width: int) -> list[dict]:
    """The parts of a COCO `segmentation` as RLEs, one per polygon or RLE.

    Accepts a list of polygons (each a flat [x1, y1, x2, y2, ...] list), a single flat polygon
    (some Hugging Face copies store one), an RLE dict (compressed string/bytes or uncompressed
    counts), a list of RLE dicts, or any of these as a JSON string. A polygon of fewer than 3
    points encloses nothing and is left out.
    """
    out = []
    for k, part in enumerate(_parts(segmentation)):
        if isinstance(part, Mapping):
            out.append(_rle_obj(part, height, width))
        elif isinstance(part, list | tuple):
            rle = _polygon_rle(part, k, height, width)
            if rle is not None:
                out.append(rle)
        else:
            raise AnnotationError(f"segmentation part {k} is {type(part).__name__}, "
                                  "not a polygon or an RLE")
    return out


def _decode(rle: dict, k: int) -> np.ndarray:
    try:
        return mask_utils.decode(rle)
    except Exception as e:  # pycocotools raises bare errors on corrupt counts
        raise AnnotationError(f"segmentation part {k} cannot be decoded: {e}") from e


def coco_mask(segmentation: Any, height: int, width: int, parts: str = "lisa") -> np.ndarray:
    """Boolean (H, W) target of a COCO `segmentation` (forms: `coco_parts`), its parts merged
    as `parts` says.

    - "lisa": refer's `getMask` and LISA's ValDataset decode every part and sum them (as
      uint8), so a pixel covered by two parts has the value 2. LISA's metric
      (`intersectionAndUnionGPU`, K=2, `torch.histc` over [0, 1]) counts such a pixel in no
      class: never target, never intersection, and in the union exactly where predicted, which
      is what class 1's counts do for a background pixel. So the target is the pixels covered
      by exactly one part (the count mod 256 is 1, as the uint8 sum wraps), the rest background:
      gIoU and cIoU equal LISA's for any prediction. (`IGNORE` would differ: it also drops
      predicted overlap pixels from the union.)
    - "union": the union of the parts (pycocotools' `merge`), overlaps included.

    Holes come from RLE. An empty list gives an empty mask (LISA scores such a ref against an
    empty target).
    """
    if parts not in PARTS:
        raise ValueError(f"parts must be one of {PARTS}, got {parts!r}")
    rles = coco_parts(segmentation, height, width)
    if parts == "union":
        out = np.zeros((height, width), dtype=bool)
        for k, rle in enumerate(rles):
            out |= _decode(rle, k).astype(bool)
        return out
    count = np.zeros((height, width), dtype=np.uint8)
    for k, rle in enumerate(rles):
        count += _decode(rle, k)  # wraps at 256 like LISA's astype(np.uint8)
    return count == 1


def _canvas(parts: list[Any]) -> tuple[int, int]:
    """An image size that holds every polygon part (pycocotools' pixels inside an image do not
    depend on its size) or the size an RLE part states."""
    for p in parts:
        if isinstance(p, Mapping) and isinstance(p.get("size"), Sequence):
            h, w = p["size"]
            return int(h), int(w)
    polys = [p for p in parts if isinstance(p, list | tuple)]
    xs = [float(v) for p in polys for v in p[0::2] if _is_number(v)]
    ys = [float(v) for p in polys for v in p[1::2] if _is_number(v)]
    if not xs or not all(map(math.isfinite, xs + ys)):
        return 1, 1
    return max(1, math.ceil(max(ys)) + 1), max(1, math.ceil(max(xs)) + 1)


def parts_overlap(segmentation: Any, height: int | None = None,
                  width: int | None = None) -> bool:
    """Whether two parts of a COCO `segmentation` share a pixel, from RLE areas (no dense
    decode): the case where `parts` "lisa" and "union" differ. Without a size, one that holds
    every part (so an overlap outside the image would count too)."""
    if height is None or width is None:
        height, width = _canvas(_parts(segmentation))
    rles = coco_parts(segmentation, height, width)
    if len(rles) < 2:
        return False
    try:
        merged = mask_utils.merge(rles, intersect=False)
        return int(mask_utils.area(merged)) < int(sum(mask_utils.area(rles)))
    except Exception as e:  # bare pycocotools errors on corrupt counts
        raise AnnotationError(f"segmentation parts cannot be merged: {e}") from e
