"""`rescue.datasets.raster` against OpenCV 4.8's own masks, its Bresenham loop, and invariants.

OpenCV 4.8 itself is not installed here (the project may get 5.x), so its output is recorded:
`tests/fixtures/lisa_golden/cv48_polygons.npz`, written by `make_cv48_polygons.py` beside it
under opencv-python-headless 4.8.0.74 (the ReasonSeg golden split is `tests/test_lisa_golden.py`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rescue.datasets.raster import bresenham_steps, clip_line, line_pixels, polygon_mask

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "lisa_golden" / "cv48_polygons.npz"


def _cases() -> list[tuple[np.ndarray, int, int, np.ndarray]]:
    z = np.load(FIXTURE)
    pts = np.split(z["points"], np.cumsum(z["counts"])[:-1])
    bits = np.split(z["masks"], np.cumsum(z["mask_bytes"])[:-1])
    out = []
    for p, b, (h, w) in zip(pts, bits, z["sizes"].tolist(), strict=True):
        out.append((p, h, w, np.unpackbits(b, count=h * w).reshape(h, w).astype(bool)))
    return out


CASES = _cases()


def test_fixture_was_recorded_under_opencv_48() -> None:
    assert str(np.load(FIXTURE)["versions"][0]).startswith("4.8.")
    assert len(CASES) == 624


def test_every_recorded_polygon_matches_opencv_48() -> None:
    bad = [k for k, (p, h, w, want) in enumerate(CASES)
           if not np.array_equal(polygon_mask(p, h, w), want)]
    assert bad == []


def test_installed_opencv_agrees_when_it_is_48() -> None:
    """Where the installed OpenCV is 4.8 it must give the recorded masks too; a later one may
    not (5.x fills fewer boundary pixels), which is why masks do not use it."""
    import cv2

    differ = 0
    for p, h, w, want in CASES:
        m = np.zeros((h, w), np.uint8)
        cv2.polylines(m, p[None], True, 1, 1)
        cv2.fillPoly(m, p[None], 1)
        differ += not np.array_equal(m.astype(bool), want)
    if cv2.__version__.startswith("4.8."):
        assert differ == 0
    elif differ == 0:
        pytest.skip(f"OpenCV {cv2.__version__} happens to agree on every recorded case")


def _opencv_steps(major: int, minor: int) -> list[int]:
    """OpenCV's LINE_8 LineIterator, step by step: error term, then the minor-axis offsets."""
    err, m, out = major - 2 * minor, 0, [0]
    for _ in range(major):
        if err < 0:
            m += 1
            err += 2 * major - 2 * minor
        else:
            err -= 2 * minor
        out.append(m)
    return out


def test_bresenham_closed_form_equals_the_loop() -> None:
    for major in range(0, 70):
        for minor in range(0, major + 1):
            assert bresenham_steps(major, minor).tolist() == _opencv_steps(major, minor), \
                (major, minor)


def test_lines_are_8_connected_and_end_at_their_points() -> None:
    rng = np.random.default_rng(3)
    for _ in range(300):
        p, q = (tuple(int(v) for v in rng.integers(0, 40, 2)) for _ in range(2))
        r, c = line_pixels(p, q, 40, 40)
        ends = {(int(r[0]), int(c[0])), (int(r[-1]), int(c[-1]))}
        assert ends == {(p[1], p[0]), (q[1], q[0])}
        assert len(r) == max(abs(p[0] - q[0]), abs(p[1] - q[1])) + 1
        assert (np.maximum(np.abs(np.diff(r)), np.abs(np.diff(c))) == 1).all()


def test_clip_line() -> None:
    assert clip_line((2, 3), (7, 9), 10, 10) == (True, (2, 3, 7, 9))  # inside: untouched
    assert clip_line((-5, -1), (-2, 8), 10, 10)[0] is False  # wholly left of the image
    hit, (x1, y1, x2, y2) = clip_line((-10, 5), (20, 5), 10, 10)
    assert hit and (x1, y1, x2, y2) == (0, 5, 9, 5)


def _random_polygon(rng: np.random.Generator, h: int, w: int, margin: int) -> np.ndarray:
    n = int(rng.integers(1, 10))
    return np.c_[rng.integers(margin, w - margin, n), rng.integers(margin, h - margin, n)]


def test_invariants() -> None:
    """Same mask whichever point starts the ring and whichever way it turns; a polygon moved by
    whole pixels inside the image moves its mask; it stays within its points' box."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        p = _random_polygon(rng, 40, 50, 6)
        m = polygon_mask(p, 40, 50)
        k = int(rng.integers(len(p)))
        np.testing.assert_array_equal(polygon_mask(np.roll(p, k, axis=0), 40, 50), m)
        np.testing.assert_array_equal(polygon_mask(p[::-1], 40, 50), m)
        dx, dy = (int(v) for v in rng.integers(-5, 6, 2))
        moved = polygon_mask(p + np.array([dx, dy]), 40, 50)
        np.testing.assert_array_equal(moved, np.roll(m, (dy, dx), axis=(0, 1)))
        rows, cols = np.nonzero(m)
        assert rows.min() >= p[:, 1].min() and rows.max() <= p[:, 1].max()
        assert cols.min() >= p[:, 0].min() and cols.max() <= p[:, 0].max()
        assert m[p[:, 1], p[:, 0]].all()  # every vertex is painted


def test_simple_shapes() -> None:
    rect = np.array([[2, 3], [9, 3], [9, 7], [2, 7]])
    want = np.zeros((12, 12), bool)
    want[3:8, 2:10] = True  # both corners inclusive
    np.testing.assert_array_equal(polygon_mask(rect, 12, 12), want)
    one = polygon_mask(np.array([[4, 5]]), 12, 12)
    assert one.sum() == 1 and one[5, 4]
    assert not polygon_mask(np.array([[40, 50], [60, 70], [45, 90]]), 12, 12).any()
    assert not polygon_mask(np.zeros((0, 2), int), 12, 12).any()
