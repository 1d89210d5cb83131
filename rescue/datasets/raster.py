"""Integer polygons to pixels exactly as OpenCV 4.8 draws them, with no OpenCV.

ReasonSeg's ground truth is whatever LISA's `get_mask_from_json` painted: `cv2.polylines`
(closed, 1 px, 8-connected) then `cv2.fillPoly` over each shape, in LISA's pinned environment
(opencv-python 4.8.0.74). OpenCV 5.x fills some boundary pixels differently, so masks follow
4.8 here whatever OpenCV is installed. Checked pixel for pixel against 4.8.0.74 itself: the
golden ReasonSeg split (`tests/fixtures/lisa_golden/`, `tests/test_lisa_golden.py`) and 624
random polygons recorded under 4.8 (`cv48_polygons.npz` there,
`tests/datasets/test_raster.py`).
The rules, restated from OpenCV 4.8's drawing code:

- outline: each edge (the last point back to the first included) is clipped to the image by
  integer Cohen-Sutherland (C division, truncating toward zero), then walked by 8-connected
  Bresenham from its left end (`line_pixels`);
- fill: in 16.16 fixed point, an edge's x on row y is `x_top + (y - y_top) * dx` with `dx`
  truncated toward zero; a row meets the edges with `y_top <= y < y_bottom` (horizontal edges
  none), their x's are sorted and paired, and each pair fills `floor(x_a) .. floor(x_b)`
  (`fill_spans`).

`polygon_mask` is the union of the two, which is what the pair of OpenCV calls leaves.
Coordinates are exact Python integers here; OpenCV's own 64-bit arithmetic only overflows for
coordinates near the int32 limits, far outside any annotation.
"""

from __future__ import annotations

import numpy as np

_SHIFT = 16  # OpenCV's XY_SHIFT: edge x's are 16.16 fixed point while filling


def _tdiv(a: int, b: int) -> int:
    """C integer division: truncates toward zero (Python's // floors)."""
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


def _outcode(x: int, y: int, right: int, bottom: int) -> int:
    return (x < 0) | (x > right) << 1 | (y < 0) << 2 | (y > bottom) << 3


def clip_line(p: tuple[int, int], q: tuple[int, int], height: int,
              width: int) -> tuple[bool, tuple[int, int, int, int]]:
    """The segment p-q clipped to the image as OpenCV's integer `clipLine` does: whether any of
    it is inside, and the end points as the clip left them (moved part way even when it misses,
    which the fill reads). The y clip of both ends comes before the x clip."""
    (x1, y1), (x2, y2) = p, q
    right, bottom = width - 1, height - 1
    c1, c2 = _outcode(x1, y1, right, bottom), _outcode(x2, y2, right, bottom)
    if c1 & c2 == 0 and c1 | c2:
        if c1 & 12:
            a = 0 if c1 < 8 else bottom
            x1 += _tdiv((a - y1) * (x2 - x1), y2 - y1)
            y1, c1 = a, (x1 < 0) | (x1 > right) << 1
        if c2 & 12:
            a = 0 if c2 < 8 else bottom
            x2 += _tdiv((a - y2) * (x2 - x1), y2 - y1)
            y2, c2 = a, (x2 < 0) | (x2 > right) << 1
        if c1 & c2 == 0 and c1 | c2:
            if c1:
                a = 0 if c1 == 1 else right
                y1 += _tdiv((a - x1) * (y2 - y1), x2 - x1)
                x1, c1 = a, 0
            if c2:
                a = 0 if c2 == 1 else right
                y2 += _tdiv((a - x2) * (y2 - y1), x2 - x1)
                x2, c2 = a, 0
    return c1 | c2 == 0, (x1, y1, x2, y2)


def _inside(p: tuple[int, int], height: int, width: int) -> bool:
    return 0 <= p[0] < width and 0 <= p[1] < height


def bresenham_steps(major: int, minor: int) -> np.ndarray:
    """Minor-axis offset of each of the `major + 1` pixels of an 8-connected line, in closed
    form: OpenCV steps the minor axis when its error term `major - 2*minor*(i+1) +
    2*major*m_i` is negative, which gives `m_i = max(0, ceil((2*minor*i - major) / (2*major)))`
    (`tests/datasets/test_raster.py` checks it against the step-by-step loop)."""
    i = np.arange(major + 1, dtype=np.int64)
    if major == 0:
        return np.zeros(1, np.int64)
    return np.maximum(0, -((major - 2 * minor * i) // (2 * major)))


def line_pixels(p: tuple[int, int], q: tuple[int, int], height: int,
                width: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) OpenCV 4.8's `cv2.line(..., thickness=1, lineType=LINE_8)` paints."""
    x1, y1, x2, y2 = (*p, *q)
    if not (_inside(p, height, width) and _inside(q, height, width)):
        hit, (x1, y1, x2, y2) = clip_line(p, q, height, width)
        if not hit:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if x2 < x1:  # walked left to right
        x1, y1, x2, y2 = x2, y2, x1, y1
    dx, dy = x2 - x1, y2 - y1
    sy = -1 if dy < 0 else 1
    dy = abs(dy)
    if dy > dx:  # steep: y is the major axis
        i = np.arange(dy + 1, dtype=np.int64)
        return y1 + sy * i, x1 + bresenham_steps(dy, dx)
    i = np.arange(dx + 1, dtype=np.int64)
    return y1 + sy * bresenham_steps(dx, dy), x1 + i


def _edge(p: tuple[int, int], q: tuple[int, int], height: int,
          width: int) -> tuple[int, int, int, int] | None:
    """(y_top, y_bottom, x at y_top, dx per row) of one fill edge in 16.16 fixed point, None
    for a horizontal one. OpenCV 4.8 takes an edge inside the image at pixel centres (x + 1/2);
    one with an end outside from its clipped end points (as `clip_line` leaves them, at pixel
    left edges, unless the clipped segment is horizontal: then the raw ends), extrapolated
    back to the raw end's row."""
    if p[1] == q[1]:
        return None
    half = 1 << (_SHIFT - 1)
    pc, qc = (p[0] << _SHIFT, p[1]), (q[0] << _SHIFT, q[1])
    if _inside(p, height, width) and _inside(q, height, width):
        pc, qc = (pc[0] + half, pc[1]), (qc[0] + half, qc[1])
    else:
        _, (x1, y1, x2, y2) = clip_line(p, q, height, width)
        if y1 != y2:
            pc, qc = (x1 << _SHIFT, y1), (x2 << _SHIFT, y2)
    dx = _tdiv(qc[0] - pc[0], qc[1] - pc[1])
    (top, topc), bottom = ((p, pc), q) if p[1] < q[1] else ((q, qc), p)
    return top[1], bottom[1], topc[0] + (top[1] - topc[1]) * dx, dx


def fill_spans(points: np.ndarray, height: int,
               width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, first col, last col) of each run `cv2.fillPoly` (OpenCV 4.8, shift 0, LINE_8)
    fills for one polygon of integer points, clipped to the image; its outline not included."""
    ends = np.asarray(points, dtype=np.int64).reshape(-1, 2).tolist()
    edges = [e for a, b in zip([ends[-1], *ends[:-1]], ends, strict=True)
             if (e := _edge(tuple(a), tuple(b), height, width)) is not None]
    empty = np.zeros(0, np.int64)
    if len(edges) < 2:
        return empty, empty, empty
    rows, xs = [], []
    for y0, y1, x0, dx in edges:
        ys = np.arange(max(y0, 0), min(y1, height), dtype=np.int64)
        rows.append(ys)
        xs.append(x0 + (ys - y0) * dx)
    row, x = np.concatenate(rows), np.concatenate(xs)
    order = np.lexsort((x, row))
    row, x = row[order], x[order]
    # Every row meets an even number of edges (half-open in y), so consecutive x's pair up.
    first, last = x[0::2] >> _SHIFT, x[1::2] >> _SHIFT
    row = row[0::2]
    first, last = np.maximum(first, 0), np.minimum(last, width - 1)
    ok = first <= last
    return row[ok], first[ok], last[ok]


def polygon_mask(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boolean (H, W): what `cv2.polylines(m, [pts], True, 1, 1)` plus `cv2.fillPoly(m, [pts],
    1)` paint under OpenCV 4.8 for integer (x, y) points (one point paints one pixel)."""
    pts = np.asarray(points, dtype=np.int64).reshape(-1, 2)
    out = np.zeros((height, width), dtype=bool)
    if not len(pts) or height <= 0 or width <= 0:
        return out
    row, first, last = fill_spans(pts, height, width)
    if len(row):
        # +1 where a run starts, -1 after it ends; runs of a row overlap by at most a pixel,
        # so the running sum stays small and int8 keeps a large image's buffer small
        runs = np.zeros((height, width + 1), dtype=np.int8)
        np.add.at(runs, (row, first), 1)
        np.add.at(runs, (row, last + 1), -1)
        out |= np.cumsum(runs, axis=1, dtype=np.int8)[:, :width] > 0
    ends = pts.tolist()
    for p, q in zip([ends[-1], *ends[:-1]], ends, strict=True):
        r, c = line_pixels(tuple(p), tuple(q), height, width)
        out[r, c] = True
    return out
