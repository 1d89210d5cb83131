"""A verifier's views are drawn and encoded cheaply but to the same bytes as before: the bytes
feed the verifier's cache keys. Each test compares the shipped code with the formulas it
replaced (tests/reference_views.py) on random and edge-case images and masks."""

import cv2
import numpy as np
import pytest
from reference_views import crop_box as ref_crop_box
from reference_views import data_url as ref_data_url
from reference_views import draw_overlay as ref_draw_overlay
from reference_views import view_urls as ref_view_urls

from rescue.datasets.synthetic import SyntheticDataset
from rescue.models.chat import ImageEncoding
from rescue.models.views import (
    OverlayStyle,
    crop_box,
    draw_overlay,
    render_views,
    serial_opencv,
)

COLORS = [(255, 0, 0), (0, 0, 0), (255, 255, 255), (17, 200, 99), (128, 127, 1)]


def _masks(rng: np.random.Generator, h: int, w: int) -> list[np.ndarray]:
    """Empty, full, one pixel (a corner and the middle), a band along each edge, random noise at
    two densities and a filled disc."""
    out = [np.zeros((h, w), bool), np.ones((h, w), bool)]
    for y, x in ((0, 0), (h - 1, w - 1), (h // 2, w // 3)):
        m = np.zeros((h, w), bool)
        m[y, x] = True
        out.append(m)
    for sl in (np.s_[:3, :], np.s_[-2:, :], np.s_[:, :1], np.s_[:, -4:]):
        m = np.zeros((h, w), bool)
        m[sl] = True
        out.append(m)
    out += [rng.random((h, w)) < 0.05, rng.random((h, w)) < 0.6]
    yy, xx = np.mgrid[:h, :w]
    out.append((yy - h * 0.4) ** 2 + (xx - w * 0.6) ** 2 < (min(h, w) * 0.3) ** 2)
    return out


@pytest.mark.parametrize("alpha", [0, 0.0, 0.4, 1.0, 1, 0.3])  # 0.3: float64 would differ
@pytest.mark.parametrize("shape", [(256, 256), (37, 53), (1, 1), (5, 200)])
def test_draw_overlay_bytes_equal_the_whole_image_formula(alpha, shape):
    rng = np.random.default_rng([int(alpha * 100), *shape])
    h, w = shape
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[0, 0] = (0, 0, 0)  # the ends of the range, where clipping bites
    image[-1, -1] = (255, 255, 255)
    before = image.copy()
    for k, mask in enumerate(_masks(rng, h, w)):
        color = COLORS[k % len(COLORS)]
        style = OverlayStyle(color=color, alpha=alpha, outline_px=1 + k % 3)
        got = draw_overlay(image, mask, style)
        want = ref_draw_overlay(image, mask, style)
        assert got.dtype == np.uint8 and got.shape == image.shape and got.flags.c_contiguous
        assert np.array_equal(got, want), (k, color, alpha)
        halo = draw_overlay(image, mask, style, halo=(255, 255, 255))
        assert np.array_equal(halo, ref_draw_overlay(image, mask, style, halo=(255, 255, 255)))
    assert np.array_equal(image, before)  # the input is not modified


def test_draw_overlay_tints_masked_pixels_and_leaves_the_rest():
    """The comparison above could pass with both formulas broken the same way: the tint is
    where the mask is and nowhere else."""
    image = np.full((20, 20, 3), 100, np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    out = draw_overlay(image, mask, OverlayStyle(alpha=0.4, outline_px=1))
    assert tuple(out[10, 10]) == (162, 60, 60)  # 0.6 * 100 + 0.4 * (255, 0, 0), rounded
    assert (out[~np.pad(mask[1:-1, 1:-1], 1) & ~mask] == 100).all()


def test_draw_overlay_of_views_and_other_dtypes_equals_the_formula():
    """A strided view of an image, and an image that is not uint8 (the whole image is
    converted then: only uint8 pixels come back unchanged from the rounding)."""
    rng = np.random.default_rng(7)
    big = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    mask = rng.random((45, 60)) < 0.3
    style = OverlayStyle(alpha=0.4)
    view = big[::2, ::2]
    assert np.array_equal(draw_overlay(view, mask, style), ref_draw_overlay(view, mask, style))
    fortran = np.asfortranarray(mask)  # flat indices are taken in C order whatever the layout
    assert np.array_equal(draw_overlay(view, fortran, style), ref_draw_overlay(view, mask, style))
    for dtype in (np.float64, np.float32, np.uint16, np.int32):
        img = (rng.random((45, 60, 3)) * 300 - 20).astype(dtype)
        got = draw_overlay(img, mask, style)
        assert got.dtype == np.uint8
        assert np.array_equal(got, ref_draw_overlay(img, mask, style)), dtype
    with pytest.raises(ValueError, match="mask shape"):
        draw_overlay(big, mask, style)


@pytest.mark.parametrize("shape", [(256, 256), (37, 53), (1, 1), (3, 300), (300, 2)])
def test_crop_box_equals_the_nonzero_box(shape):
    rng = np.random.default_rng(list(shape))
    h, w = shape
    styles = [OverlayStyle(), OverlayStyle(crop_context=0.0, crop_min_px=1),
              OverlayStyle(crop_context=1.3, crop_min_px=64)]
    for mask in _masks(rng, h, w):
        for style in styles:
            assert crop_box(mask, style) == ref_crop_box(mask, style)
            assert crop_box(mask.astype(np.uint8), style) == ref_crop_box(mask, style)
    assert crop_box(np.zeros(shape, bool), OverlayStyle()) is None
    one = np.zeros((100, 100), bool)
    one[0, 99] = True  # a corner pixel: the box touches both edges, grown to crop_min_px
    assert crop_box(one, OverlayStyle(crop_min_px=32)) == (83, 0, 100, 17)


def _candidates() -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, mask) pairs of the synthetic dataset: each target, each object, and an empty
    mask, so crops are zoomed in (INTER_CUBIC), zoomed out (INTER_AREA) and absent."""
    ds = SyntheticDataset(num_samples=4, seed=0)
    out = []
    for sid in ds.sample_ids():
        sample, scene = ds.load(sid), ds.scene(sid)
        out += [(sample.image, sample.target), (sample.image, np.zeros_like(sample.target))]
        out += [(sample.image, o.visible) for o in scene.objects]
    big = np.kron(out[0][0], np.ones((3, 3, 1), np.uint8))  # 768 px: the crop shrinks to 512
    out.append((big, np.kron(out[0][1], np.ones((3, 3), bool))))
    return out


@pytest.mark.parametrize("encoding", [{}, {"quality": 75}, {"format": "png"},
                                      {"max_side": 200}])
def test_view_urls_equal_the_old_drawing_and_encoding(encoding):
    """What the verifier sends (and keys its cache on): the shipped config's views [overlay,
    crop] at JPEG q90 and the other encodings, byte for byte."""
    enc = ImageEncoding.from_config(encoding)
    candidates = _candidates()
    if enc.format == "png":  # PNG is slow to encode; its path does not touch the change
        candidates = candidates[:3] + candidates[-1:]
    for views in (["overlay", "crop"], ["crop", "image", "overlay"]):
        style = OverlayStyle.from_config({"views": views})
        for image, mask in candidates:
            got = tuple(enc.data_url(v) for _, v in render_views(image, mask, style))
            assert got == ref_view_urls(image, mask, style, enc)
            assert len(got) == len(views)


def test_data_url_of_grey_and_rgba_equals_the_old_encoding():
    """Only an RGB image skips `convert("RGB")`; grey and RGBA images are still converted."""
    rng = np.random.default_rng(3)
    for shape in ((40, 30), (40, 30, 3), (40, 30, 4)):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        for enc in (ImageEncoding(), ImageEncoding(format="png")):
            assert enc.data_url(img) == ref_data_url(enc, img)
    assert ImageEncoding().data_url(img).startswith("data:image/jpeg;base64,/9j/")


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 13, 3), (301, 2, 3), (64, 64, 3)])
def test_jpeg_of_odd_sizes_strides_and_qualities_equals_pil(shape):
    """The RGB fast path (OpenCV's encoder) writes PIL's bytes whatever the size (partial
    MCUs), the quality and the array's layout (a flipped view is not contiguous)."""
    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    for q in (1, 50, 90, 100):
        enc = ImageEncoding(quality=q)
        for arr in (img, img[:, ::-1], img[::-1]):
            assert enc.data_url(arr) == ref_data_url(enc, np.ascontiguousarray(arr))


def test_serial_opencv_changes_no_view_and_no_synthetic_sample():
    """`serial_opencv` is process-wide: what else the client draws with OpenCV (the synthetic
    dataset) must not change either. Compared against 4 OpenCV threads (parallel on any
    machine, however few its cores)."""
    enc = ImageEncoding()
    style = OverlayStyle.from_config({"views": ["overlay", "crop"]})
    candidates = _candidates()

    def drawn():
        ds = SyntheticDataset(num_samples=4, seed=0)
        samples = [ds.load(sid) for sid in ds.sample_ids()]
        return ([(s.image.tobytes(), s.gt.tobytes()) for s in samples],
                [tuple(enc.data_url(v) for _, v in render_views(i, m, style))
                 for i, m in candidates])

    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(4)
        parallel = drawn()
        serial_opencv()
        assert cv2.getNumThreads() == 1
        assert drawn() == parallel
    finally:
        cv2.setNumThreads(before)
