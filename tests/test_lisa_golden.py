"""ReasonSeg loads to exactly what LISA's own code produced in its pinned environment.

`tests/fixtures/lisa_golden/` (README there): a LISA-layout split built for the edge cases of
`get_mask_from_json`, and per stem the mask LISA made under numpy 1.24.2 + opencv 4.8.0.74, the
text it validates with, `is_sentence`, the image's shape and digest, or the error LISA raised.
Every stem is checked, under whatever OpenCV this project installs. `d_many` (20 shapes, ties
among them) is implementation-defined in LISA: it is checked against our documented rule.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from rescue.datasets.base import SampleError
from rescue.datasets.raster import polygon_mask
from rescue.datasets.reasonseg import ReasonSegDataset
from rescue.sample import IGNORE

GOLDEN = Path(__file__).parent / "fixtures" / "lisa_golden"
MASKS = np.load(GOLDEN / "lisa_ref_pinned.npz")
META = json.loads((GOLDEN / "lisa_ref_pinned.npz.json").read_text(encoding="utf-8"))
IMPLEMENTATION_DEFINED = {"d_many"}


@pytest.fixture(scope="module")
def ds() -> ReasonSegDataset:
    return ReasonSegDataset(GOLDEN, split="val")


def test_the_fixture_is_lisas_pinned_run() -> None:
    assert (META["numpy"], META["cv2"]) == ("1.24.2", "4.8.0")
    with_mask = {s for s, m in META["meta"].items() if "error" not in m}
    assert with_mask == set(MASKS.files)


def test_samples_are_the_jpg_stems_lisa_globs(ds: ReasonSegDataset) -> None:
    jpgs = sorted(p.stem for p in (GOLDEN / "val").glob("*.jpg"))
    assert ds.sample_ids() == jpgs == sorted(META["meta"])
    assert "i_orphan_json" not in ds.sample_ids()  # a JSON without its image is no sample


@pytest.mark.parametrize("stem", sorted(META["meta"]))
def test_every_stem_loads_to_lisas_outcome(ds: ReasonSegDataset, stem: str) -> None:
    want = META["meta"][stem]
    if "error" in want:
        assert "FileNotFoundError" in want["error"] and stem == "j_orphan_jpg"
        with pytest.raises(SampleError, match=r"annotation missing or unreadable") as info:
            ds.load(stem)
        assert info.value.tags == ()  # no JSON: nothing says long or short
        return
    s = ds.load(stem)
    assert s.query == want["text"]
    assert s.tags == (("long",) if want["is_sentence"] else ("short",))
    assert list(s.image.shape) == want["shape"]
    assert hashlib.sha256(s.image.tobytes()).hexdigest()[:16] == want["image_sha"]
    assert s.gt.dtype == np.uint8
    if stem not in IMPLEMENTATION_DEFINED:
        np.testing.assert_array_equal(s.gt, MASKS[stem], err_msg=stem)


def _shapes(stem: str) -> list[tuple[np.ndarray, int]]:
    anno = json.loads((GOLDEN / "val" / f"{stem}.json").read_text(encoding="utf-8"))
    out = []
    for sh in anno["shapes"]:
        if sh["label"].lower() == "flag":
            continue
        pts = np.array(sh["points"], dtype=np.float64).astype(np.int32)
        out.append((pts, IGNORE if "ignore" in sh["label"].lower() else 1))
    return out


def test_d_many_follows_the_documented_stable_order(ds: ReasonSegDataset) -> None:
    """Largest first; among equal areas the earlier shape ends on top. Brute force: paint
    shape by shape in that order, each one's area counted alone."""
    shapes = _shapes("d_many")
    h, w = MASKS["d_many"].shape
    drawn = [(polygon_mask(p, h, w), v) for p, v in shapes]
    areas = [int(m.sum()) for m, _ in drawn]
    assert len(shapes) == 20 and len(set(areas)) < len(areas)  # ties, more than 16 shapes
    order = sorted(range(len(drawn)), key=lambda i: (-areas[i], -i))
    want = np.zeros((h, w), np.uint8)
    for i in order:
        want[drawn[i][0]] = drawn[i][1]
    np.testing.assert_array_equal(ds.load("d_many").gt, want)


def test_d_many_differs_from_lisa_only_where_tied_shapes_disagree(ds: ReasonSegDataset) -> None:
    """The rasterisation is LISA's there too: only the order of equal-area shapes that overlap
    with different values can differ."""
    ref = MASKS["d_many"]
    h, w = ref.shape
    got = ds.load("d_many").gt
    drawn = [(polygon_mask(p, h, w), v) for p, v in _shapes("d_many")]
    covered = np.any([m for m, _ in drawn], axis=0)
    np.testing.assert_array_equal(got > 0, covered)
    np.testing.assert_array_equal(ref > 0, covered)
    contested = np.zeros((h, w), bool)
    for i, (mi, vi) in enumerate(drawn):
        for mj, vj in drawn[i + 1:]:
            if vi != vj and mi.sum() == mj.sum():
                contested |= mi & mj
    assert ((got != ref) <= contested).all()
    assert (got != ref).any()  # LISA's numpy 1.24 introsort did reorder some ties here


def test_masks_do_not_depend_on_the_installed_opencv(ds: ReasonSegDataset,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """No OpenCV drawing call is made for ReasonSeg masks (OpenCV only decodes the image)."""
    import cv2

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("OpenCV drawing used")

    for name in ("fillPoly", "polylines", "fillConvexPoly", "line", "drawContours"):
        monkeypatch.setattr(cv2, name, boom)
    np.testing.assert_array_equal(ds.load("a_overlap").gt, MASKS["a_overlap"])
