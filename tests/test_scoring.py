"""Scoring one sample is a pure function of its answers: untrusted masks checked, IoU counted."""

import numpy as np

from rescue import masks
from rescue.hypothesis import Hypothesis, Prompt
from rescue.protocols import Segmentation, Verdict
from rescue.sample import Sample
from rescue.scoring import check_masks, pair_iou, score_sample


def _sample():
    gt = np.zeros((8, 8), np.uint8)
    gt[:4, :4] = 1
    return Sample(sample_id="s", query="q", image=np.zeros((8, 8, 3), np.uint8), gt=gt,
                  dataset="d")


def test_bad_masks_become_execute_failures_and_good_ones_are_scored():
    s = _sample()
    good = np.zeros((8, 8), bool)
    good[:4, :4] = True
    segs = {"a": Segmentation(rle=masks.encode(good), score=0.9),
            "b": Segmentation(rle=masks.encode(np.ones((4, 4), bool))),
            "c": Segmentation(rle={"size": [8, 8], "counts": [64]})}
    found = check_masks(s, segs)
    assert found.segmentations["b"].error.startswith("execute:bad_mask_shape")
    assert found.segmentations["c"].error.startswith("execute:bad_rle")
    assert list(found.digest_of) == ["a"] and len(found.decoded) == 1
    hyps = [Hypothesis(index=i, prompt=Prompt(text=t)) for i, t in enumerate("aab")]
    keys = {h.prompt.key: k for h, k in zip(hyps, "aab", strict=True)}
    found = check_masks(s, {p: segs[k] for p, k in keys.items()})
    (d,) = found.decoded
    rec = score_sample(s, hyps, found, {d: Verdict(score=0.5)}, simulated=False)
    a, dup, bad = rec.candidates
    assert (a.intersection, a.union, a.iou) == (16, 16, 1.0) and dup.duplicate_of == 0
    assert bad.failed_stage == "execute" and bad.union == 16 and rec.masks == [d]


def test_pair_iou_treats_two_empty_masks_as_agreeing():
    empty = masks.empty(4, 4)
    full = masks.encode(np.ones((4, 4), bool))
    np.testing.assert_array_equal(pair_iou([empty, empty, full]),
                                  [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert pair_iou([]).shape == (0, 0)
