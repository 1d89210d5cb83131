"""The server's pure parts: prompt checks against a brute-force reference, the image LRU's
single flight (image decoding is `rescue.images`: tests/test_images.py and
test_sam_server_images.py)."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from servers.image_cache import ImageCache
from servers.prompts import PromptInvalid, validate_prompt
from servers.protocol import PromptIn


def _reference_box(box, w, h, tol):
    """Accepted box after clipping, or None: the rule of servers/README.md, spelled out."""
    if any(not math.isfinite(v) for v in box):
        return None
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        return None
    for x, y in ((x1, y1), (x2, y2)):
        if x < -tol * w or x > w + tol * w or y < -tol * h or y > h + tol * h:
            return None
    c = (min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h))
    if c[2] - c[0] < 1 or c[3] - c[1] < 1:
        return None
    return c


def test_box_rule_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    accepted = rejected = 0
    for _ in range(3000):
        w, h = (int(v) for v in rng.integers(2, 400, size=2))
        tol = float(rng.choice([0.0, 0.05, 0.2]))
        xs, ys = rng.uniform(-0.3, 1.3, size=2) * w, rng.uniform(-0.3, 1.3, size=2) * h
        if rng.random() < 0.85:  # mostly well-ordered, sometimes reversed
            xs, ys = np.sort(xs), np.sort(ys)
        box = [float(xs[0]), float(ys[0]), float(xs[1]), float(ys[1])]
        if rng.random() < 0.05:
            box[int(rng.integers(4))] = float(rng.choice([np.nan, np.inf, -np.inf]))
        want = _reference_box(box, w, h, tol)
        try:
            got = validate_prompt(PromptIn(box=box), w, h, tol, max_points=64).box
        except PromptInvalid:
            got = None
        assert got == pytest.approx(want) if want is not None else got is None, (box, w, h, tol)
        accepted += want is not None
        rejected += want is None
    assert accepted > 300 and rejected > 300  # both branches exercised


def test_points_are_clipped_to_pixels_and_text_normalised() -> None:
    p = validate_prompt(PromptIn(text="  the   red\tmug ", points=[[-3, 5], [101, 49.5]],
                                 point_labels=[1, 0]), 100, 50, 0.05, 64)
    assert p.text == "the red mug"
    assert p.points == ((0.0, 5.0), (99.0, 49.0))
    assert p.point_labels == (1, 0)
    assert validate_prompt(PromptIn(text="   ", box=[1, 1, 9, 9]), 10, 10, 0, 64).text is None
    with pytest.raises(PromptInvalid, match="at most 2"):
        validate_prompt(PromptIn(points=[[1, 1]] * 3, point_labels=[1] * 3), 10, 10, 0, 2)


def test_lru_evicts_least_recently_used() -> None:
    cache = ImageCache(2)
    img = np.zeros((2, 2, 3), np.uint8)
    for key in "abc":
        if key == "c":
            assert cache.get("a") is not None  # a is now more recent than b
        cache.get_or_encode(key, img, lambda im: object())
    assert cache.get("b") is None and cache.get("a") is not None
    assert cache.get("c") is not None
    assert cache.encodes == 3 and len(cache) == 2
    none = ImageCache(0)
    none.get_or_encode("a", img, lambda im: 1)
    none.get_or_encode("a", img, lambda im: 1)
    assert none.encodes == 2 and len(none) == 0


def test_concurrent_requests_for_one_image_share_one_encode() -> None:
    cache = ImageCache(4)
    img = np.zeros((2, 2, 3), np.uint8)
    started = threading.Event()

    def slow_encode(im):
        started.set()
        time.sleep(0.2)
        return object()

    results = []
    threads = [threading.Thread(target=lambda: results.append(
        cache.get_or_encode("k", img, slow_encode))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert cache.encodes == 1
    states = {id(item.state) for item, _ in results}
    assert len(states) == 1 and len(results) == 8
    assert sorted(cached for _, cached in results) == [False] + [True] * 7


def test_encode_error_reaches_waiters_and_is_not_cached() -> None:
    cache = ImageCache(4)
    img = np.zeros((2, 2, 3), np.uint8)

    def boom(im):
        raise RuntimeError("encoder down")

    with pytest.raises(RuntimeError, match="encoder down"):
        cache.get_or_encode("k", img, boom)
    item, cached = cache.get_or_encode("k", img, lambda im: "ok")
    assert item.state == "ok" and not cached


@pytest.mark.parametrize("ref", [
    {"b64": "QQ=="}, {"sha256": "a" * 64}, {"b64": "QQ==", "sha256": None},
    {"b64": None, "sha256": "a" * 64}, {"b64": "QQ==", "sha256": "a" * 64}, {}, {"b64": None},
    {"b64": None, "sha256": None}, {"sha256": "A" * 64},
])
def test_the_schema_states_the_exactly_one_image_rule(ref) -> None:
    # issue 14: /openapi.json allowed both or neither, which only the validator refused
    import jsonschema
    from pydantic import ValidationError

    from servers.protocol import ImageRef

    by_schema = jsonschema.Draft202012Validator(ImageRef.model_json_schema()).is_valid(ref)
    try:
        ImageRef.model_validate(ref)
        by_model = True
    except ValidationError:
        by_model = False
    assert by_schema == by_model, ref
