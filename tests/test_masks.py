"""rescue.masks.bbox against the definition: the extremes of np.nonzero, on every kind of mask."""

import numpy as np

from rescue import masks


def _by_nonzero(mask):
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def test_bbox_equals_the_nonzero_extremes_on_random_empty_and_full_masks():
    rng = np.random.default_rng(0)
    shapes = [(1, 1), (1, 7), (7, 1), (2, 3), (5, 5), (17, 31), (64, 48)]
    seen = {"empty": 0, "full": 0, "one pixel": 0, "other": 0}
    for h, w in shapes:
        cases = [np.zeros((h, w), bool), np.ones((h, w), bool)]
        for y, x in {(0, 0), (h - 1, w - 1), (h // 2, w // 3)}:
            one = np.zeros((h, w), bool)
            one[y, x] = True
            cases.append(one)
        for density in (0.001, 0.01, 0.1, 0.5, 0.99):
            cases += [rng.random((h, w)) < density for _ in range(20)]
        for m in cases:
            kind = ("empty" if not m.any() else "full" if m.all()
                    else "one pixel" if m.sum() == 1 else "other")
            seen[kind] += 1
            for as_type in (m, m.astype(np.uint8) * 255, m.astype(np.float32),
                            np.asfortranarray(m), m[::-1, ::-1]):
                assert masks.bbox(as_type) == _by_nonzero(as_type), (h, w, kind)
    assert all(seen.values())  # every kind was tried
    assert masks.bbox(np.zeros((4, 6), bool)) is None
    assert masks.bbox(np.ones((4, 6), bool)) == (0.0, 0.0, 6.0, 4.0)
