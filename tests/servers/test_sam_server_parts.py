"""The server's pure parts: prompt checks against a brute-force reference, the image LRU's
single flight, image decoding limits."""

from __future__ import annotations

import math
import struct
import threading
import time
import zlib

import numpy as np
import pytest

from servers.image_cache import ImageCache
from servers.images import ImageInvalid, ImageTooLarge, decode_image, encode_png
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


def _png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header claims width x height (CRC fixed): a decompression bomb."""
    png = bytearray(encode_png(np.zeros((1, 1, 3), np.uint8)))
    ihdr = 8 + 8  # signature, then length + type of IHDR
    png[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(png[12:ihdr + 13])) & 0xFFFFFFFF
    png[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(png)


def test_size_is_checked_before_decoding() -> None:
    # over our limit, under Pillow's own bomb guard: we read the header and say its size
    with pytest.raises(ImageTooLarge) as err:
        decode_image(_png_claiming(6000, 5000), max_pixels=10**7, max_side=8192)
    assert (err.value.width, err.value.height) == (6000, 5000)
    # far over both (9e9 px): refused from the header, nothing allocated
    with pytest.raises(ImageTooLarge, match="exceeds limit"):
        decode_image(_png_claiming(100_000, 90_000), max_pixels=10**7, max_side=8192)


def test_decode_converts_to_rgb_and_rejects_garbage() -> None:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("RGBA", (7, 5), (10, 20, 30, 40)).save(buf, format="PNG")
    arr = decode_image(buf.getvalue(), 10**6, 100)
    assert arr.shape == (5, 7, 3) and arr.dtype == np.uint8 and tuple(arr[0, 0]) == (10, 20, 30)
    with pytest.raises(ImageInvalid):
        decode_image(b"GIF89a nonsense", 10**6, 100)
    with pytest.raises(ImageInvalid):
        decode_image(b"", 10**6, 100)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto 64 64 lineto stroke\n"


def test_formats_outside_the_allow_list_never_reach_their_decoder(monkeypatch) -> None:
    # issue 14: an EPS upload reached Ghostscript; now Pillow is not even asked to identify it
    from io import BytesIO

    from PIL import EpsImagePlugin, Image

    from servers.images import FORMATS

    reached = []

    def ghostscript(*args, **kw):
        reached.append(args)
        raise OSError("Ghostscript must not run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    with pytest.raises(ImageInvalid, match="not PNG, JPEG, WEBP, BMP, TIFF"):
        decode_image(EPS, 10**6, 100)
    assert reached == []
    gif = BytesIO()
    Image.new("RGB", (4, 3), (1, 2, 3)).save(gif, format="GIF")  # harmless, but not listed
    with pytest.raises(ImageInvalid):
        decode_image(gif.getvalue(), 10**6, 100)
    for fmt in FORMATS:
        buf = BytesIO()
        Image.new("RGB", (4, 3), (200, 100, 50)).save(buf, format=fmt)
        assert decode_image(buf.getvalue(), 10**6, 100).shape == (3, 4, 3), fmt


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
