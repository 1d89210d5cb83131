"""The synthetic dataset: deterministic, and every query means exactly its ground truth.

The unambiguity check re-reads each query with its own small parser and evaluates it on the
scene's objects (areas, centroids and boxes recomputed here from the visible masks), so a bug in
the generator's query logic cannot hide behind the same logic in the test.
"""

import re

import numpy as np
import pytest

from rescue import masks
from rescue.datasets.base import Dataset, SampleError
from rescue.datasets.synthetic import COLOURS, SHAPES, SyntheticDataset
from rescue.sample import IGNORE

C = "|".join(COLOURS)
S = "|".join(SHAPES)
DESC = rf"(?:({C}) )?({S}|shape)"


def _area(o):
    return int(o.visible.sum())


def _centroid(o):
    ys, xs = np.nonzero(o.visible)
    return xs.mean(), ys.mean()


def _match(o, colour, noun):
    return (colour is None or o.colour == colour) and (noun in (None, "shape") or o.shape == noun)


def referents(query: str, objects) -> set[int]:
    """Indices of the objects `query` refers to, by an independent reading of its grammar."""
    idx = range(len(objects))
    if m := re.fullmatch(rf"the ({C}) ({S})", query):
        return {i for i in idx if _match(objects[i], m[1], m[2])}
    if m := re.fullmatch(rf"the (largest|smallest) {DESC}", query):
        cands = [i for i in idx if _match(objects[i], m[2], m[3])]
        sign = 1 if m[1] == "largest" else -1
        best = max(sign * _area(objects[i]) for i in cands)
        return {i for i in cands if sign * _area(objects[i]) == best}
    if m := re.fullmatch(rf"the (leftmost|rightmost|topmost|bottommost) {DESC}", query):
        cands = [i for i in idx if _match(objects[i], m[2], m[3])]
        axis = 0 if m[1] in ("leftmost", "rightmost") else 1
        sign = 1 if m[1] in ("leftmost", "topmost") else -1
        best = min(sign * _centroid(objects[i])[axis] for i in cands)
        return {i for i in cands if sign * _centroid(objects[i])[axis] == best}
    if m := re.fullmatch(rf"the {DESC} (left of|right of|above|below) the ({C}) ({S})", query):
        refs = [i for i in idx if _match(objects[i], m[4], m[5])]
        assert len(refs) == 1, f"reference of {query!r} is not unique"
        ref = refs[0]
        axis = 0 if m[3] in ("left of", "right of") else 1
        sign = 1 if m[3] in ("left of", "above") else -1
        rc = sign * _centroid(objects[ref])[axis]
        return {i for i in idx if i != ref and _match(objects[i], m[1], m[2])
                and sign * _centroid(objects[i])[axis] < rc}
    if m := re.fullmatch(rf"all (?:({C}) )?({S}|shape)s", query):
        return {i for i in idx if _match(objects[i], m[1], m[2])}
    raise AssertionError(f"query outside the grammar: {query!r}")


@pytest.fixture(scope="module")
def many():
    ds = SyntheticDataset(num_samples=80, seed=7)
    return ds, [(ds.scene(i), ds.load(i)) for i in ds.sample_ids()]


def test_is_a_dataset():
    ds = SyntheticDataset(num_samples=3)
    assert isinstance(ds, Dataset)
    assert ds.sample_ids() == ["00000", "00001", "00002"]
    for bad in ("00003", "3", "x", "-0001"):
        with pytest.raises(SampleError):
            ds.load(bad)


def test_same_seed_same_arrays_in_any_order():
    a, b = SyntheticDataset(num_samples=8, seed=3), SyntheticDataset(num_samples=8, seed=3)
    forward = [a.load(i) for i in a.sample_ids()]
    backward = [b.load(i) for i in reversed(b.sample_ids())][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.gt, y.gt)
        assert (x.query, x.target_boxes, x.distractors, x.tags) == \
               (y.query, y.target_boxes, y.distractors, y.tags)
        assert x.image_sha256 == y.image_sha256
    again = a.load("00005")
    assert np.array_equal(again.image, forward[5].image)


def test_different_seeds_or_indices_differ():
    a, b = SyntheticDataset(num_samples=4, seed=0), SyntheticDataset(num_samples=4, seed=1)
    assert all(a.load(i).image_sha256 != b.load(i).image_sha256 for i in a.sample_ids())
    assert len({a.load(i).image_sha256 for i in a.sample_ids()}) == 4
    # more samples do not change the first ones (sample k depends on (seed, k) only)
    c = SyntheticDataset(num_samples=10, seed=0)
    assert c.load("00002").image_sha256 == a.load("00002").image_sha256


def test_every_query_refers_to_exactly_its_ground_truth(many):
    _, items = many
    for scene, sample in items:
        objs = scene.objects
        targets = referents(sample.query, objs)
        assert targets == set(scene.query.targets), sample.query
        union = np.zeros_like(sample.target)
        for i in targets:
            union |= objs[i].visible
        assert np.array_equal(sample.gt == 1, union), sample.query
        assert not (sample.gt == IGNORE).any()
        assert set(sample.target_boxes) == {masks.bbox(objs[i].visible) for i in targets}
        others = set(range(len(objs))) - targets
        assert sorted(sample.distractors) == sorted(masks.bbox(objs[i].visible) for i in others)


def test_objects_are_what_their_names_say(many):
    _, items = many
    names, palette = list(COLOURS), np.array(list(COLOURS.values()), float)
    for scene, sample in items:
        assert 3 <= len(scene.objects) <= 6
        covered = np.zeros(sample.gt.shape, int)
        for o in scene.objects:
            covered += o.visible
            mean = sample.image[o.visible].astype(float).mean(0)
            assert names[int(np.argmin(((palette - mean) ** 2).sum(1)))] == o.colour
        assert covered.max() <= 1, "visible masks must not overlap"


def test_queries_cover_every_kind(many):
    _, items = many
    tags = {s.tags for _, s in items}
    assert tags == {("attribute",), ("comparative",), ("spatial",), ("multi",)}
    multi = [s for _, s in items if s.tags == ("multi",)]
    assert all(len(s.target_boxes) >= 2 for s in multi)
    assert all(len(s.target_boxes) == 1 for _, s in items if s.tags != ("multi",))


def test_ignore_border_band():
    plain = SyntheticDataset(num_samples=2, seed=5).load("00001")
    banded = SyntheticDataset(num_samples=2, seed=5, ignore_border=2).load("00001")
    assert np.array_equal(plain.image, banded.image)
    band = banded.gt == IGNORE
    assert band.any()
    assert not (banded.target & ~plain.target).any()  # the band only removes target pixels...
    assert np.array_equal(band | banded.target, plain.target | band)  # ...or adds outside ones
    assert (band & plain.target).any() and (band & ~plain.target).any()  # on both sides


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_difficulty_presets_and_sizes(difficulty):
    ds = SyntheticDataset(num_samples=2, height=96, width=160, difficulty=difficulty,
                          min_objects=2, max_objects=4)
    s = ds.load("00000")
    assert s.image.shape == (96, 160, 3) and s.gt.shape == (96, 160)
    assert s.target.any()


def test_noise_knob_changes_pixels_not_layout():
    a = SyntheticDataset(num_samples=1, noise=0.0).load("00000")
    b = SyntheticDataset(num_samples=1, noise=30.0).load("00000")
    assert np.array_equal(a.gt, b.gt) and a.query == b.query
    assert not np.array_equal(a.image, b.image)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="difficulty"):
        SyntheticDataset(difficulty="impossible")
    with pytest.raises(ValueError):
        SyntheticDataset(min_objects=5, max_objects=3)


def test_two_objects_fall_back_to_kinds_they_allow():
    """Multi-target queries need three objects; with two the generator picks another kind."""
    ds = SyntheticDataset(num_samples=12, min_objects=2, max_objects=2, seed=1)
    for sid in ds.sample_ids():
        scene, sample = ds.scene(sid), ds.load(sid)
        assert len(scene.objects) == 2 and sample.tags != ("multi",)
        assert referents(sample.query, scene.objects) == set(scene.query.targets)
