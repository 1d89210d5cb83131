"""The one image loader (`rescue.images`) on the bad-input corpus, case by case as its manifest
says (tests/fixtures/bad_images/: each file and its expected outcome), and its seams."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from rescue.datasets.base import SampleError
from rescue.errors import UserError
from rescue.images import CODES, ImageError, ImageLimits, decode, read, sniff

CORPUS = Path(__file__).parent / "fixtures" / "bad_images"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))


def check_outcome(name: str, got: np.ndarray) -> None:
    """`got` is what the manifest row of `name` expects of a decoded image."""
    want = MANIFEST[name]
    assert got.dtype == np.uint8 and got.flags.c_contiguous
    assert list(got.shape) == want["shape"]
    for y, x, rgb in want["pixels"]:
        diff = np.abs(got[y, x].astype(int) - np.asarray(rgb)).max()
        assert diff <= want["tolerance"], (name, y, x, got[y, x].tolist(), rgb)


def test_the_corpus_covers_every_case_the_issue_names() -> None:
    files = {p.name for p in CORPUS.iterdir() if p.suffix not in (".py", ".json")}
    assert files == set(MANIFEST)
    expected = {row["expect"] for row in MANIFEST.values()}
    assert expected == {"ok", *(f"image:{c}" for c in CODES if c not in ("missing",
                                                                         "unreadable"))}
    for needed in ("truncated.png", "truncated.jpg", "empty.png", "random.bin",
                   "postscript.eps", "bomb.png", "grey16.png", "palette_transparent.png",
                   "exif_rotated.jpg", "cmyk.jpg", "rgba.png"):
        assert needed in MANIFEST


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_corpus_case_has_its_expected_outcome(name: str) -> None:
    want = MANIFEST[name]
    data = (CORPUS / name).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape
        if want["expect"] != "ok":
            with pytest.raises(ImageError) as info:
                decode(data, what=name)
            assert f"image:{info.value.code}" == info.value.reason == want["expect"]
            assert str(info.value).startswith(f"{want['expect']} {name}: ")
            return
        got = decode(data, what=name)
    check_outcome(name, got)
    if want["same_as_cv2"]:  # the decoder datasets used before (and LISA's evaluation)
        ref = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                           cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(got, ref)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    # issue 14: Pillow's convert("RGB") clipped I;16, and 99.6% of the pixels became 255
    got = decode((CORPUS / "grey16.png").read_bytes())
    assert (got == 255).mean() < 0.01
    np.testing.assert_array_equal(got[..., 0].ravel(), np.arange(256))


def test_the_size_is_decided_from_the_header() -> None:
    data = (CORPUS / "huge_12000.png").read_bytes()
    with pytest.raises(ImageError) as info:
        decode(data)
    assert (info.value.width, info.value.height) == (12_000, 12_000)
    assert "144000000 px" in str(info.value)
    # the limits are the caller's: a 4x6 image is refused under a 20 px limit
    with pytest.raises(ImageError, match="image:too_large"):
        decode((CORPUS / "rgb.png").read_bytes(), ImageLimits(max_pixels=20))
    with pytest.raises(ImageError, match="image:too_large"):
        decode((CORPUS / "rgb.png").read_bytes(), ImageLimits(max_side=5))
    assert decode((CORPUS / "rgb.png").read_bytes(), ImageLimits(max_pixels=24, max_side=6)
                  ).shape == (4, 6, 3)
    with pytest.raises(ValueError):
        ImageLimits(max_pixels=0)


def test_postscript_never_reaches_ghostscript(monkeypatch) -> None:
    from PIL import EpsImagePlugin

    reached = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: reached.append(a))
    with pytest.raises(ImageError, match="image:unsupported"):
        decode((CORPUS / "postscript.eps").read_bytes())
    assert reached == []


def test_one_error_type_for_datasets_and_for_the_user(tmp_path: Path) -> None:
    # a benchmark records it as its sample's failure; mode=infer ends in one line
    assert issubclass(ImageError, SampleError) and issubclass(ImageError, UserError)
    with pytest.raises(ImageError, match=r"^image:missing .*nope\.png: no such file"):
        read(tmp_path / "nope.png")
    with pytest.raises(ImageError, match=r"^image:unreadable"):
        read(tmp_path)  # a directory
    (tmp_path / "ok.png").write_bytes((CORPUS / "rgb.png").read_bytes())
    check_outcome("rgb.png", read(tmp_path / "ok.png"))


def test_sniff_knows_only_the_allow_list() -> None:
    assert sniff(b"\x89PNG\r\n\x1a\n....") == "PNG"
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff(b"MM\x00*\x00\x00\x00\x08") == "TIFF"
    assert sniff(b"GIF89a") is None and sniff(b"%!PS-Adobe") is None and sniff(b"") is None


def test_a_sixteen_bit_png_opened_as_32_bit_integers_is_scaled_too() -> None:
    """Older Pillow (pyproject allows >= 10) opens 16-bit grey PNGs in mode "I"."""
    from PIL import Image

    from rescue.images import _to_rgb

    img = Image.fromarray(np.array([[0, 256, 65535]], dtype=np.int32), mode="I")
    img.format = "PNG"
    assert _to_rgb(img, "x")[..., 0].tolist() == [[0, 1, 255]]
    img.format = "TIFF"  # a 32-bit integer TIFF has no defined 8-bit RGB
    with pytest.raises(ImageError, match="unsupported"):
        _to_rgb(img, "x")
