"""LISA's IoU rules on hand-made masks."""

import numpy as np
import pytest

from rescue.metrics import ciou, giou, iou, iou_counts, iou_counts_many
from rescue.sample import IGNORE


def _gt(shape=(6, 8)):
    return np.zeros(shape, dtype=np.uint8)


def test_empty_prediction_and_empty_truth_is_perfect():
    i, u = iou_counts(np.zeros((6, 8), bool), _gt())
    assert (i, u) == (0, 0)
    assert iou(i, u) == 1.0


def test_empty_prediction_on_a_target_scores_zero():
    gt = _gt()
    gt[1:3, 1:4] = 1
    i, u = iou_counts(np.zeros((6, 8), bool), gt)
    assert (i, u) == (0, 6)
    assert iou(i, u) == 0.0


def test_prediction_on_empty_truth_scores_zero():
    pred = np.zeros((6, 8), bool)
    pred[0, :3] = True
    assert iou_counts(pred, _gt()) == (0, 3)


def test_partial_overlap():
    gt = _gt()
    gt[0:2, 0:2] = 1  # 4 target pixels
    pred = np.zeros((6, 8), bool)
    pred[0:2, 1:3] = True  # 2 inside, 2 outside
    i, u = iou_counts(pred, gt)
    assert (i, u) == (2, 6)
    assert iou(i, u) == pytest.approx(1 / 3)


def test_ignore_pixels_count_in_neither_intersection_nor_union():
    gt = _gt()
    gt[0:2, 0:2] = 1
    gt[4:6, 4:8] = IGNORE
    pred = np.zeros((6, 8), bool)
    pred[0:2, 0:2] = True
    pred[4:6, 4:8] = True  # covers every ignore pixel: no penalty
    assert iou_counts(pred, gt) == (4, 4)
    # a prediction that covers only ignore pixels is empty, against a non-empty target
    only_ignore = np.zeros((6, 8), bool)
    only_ignore[4:6, 4:8] = True
    assert iou_counts(only_ignore, gt) == (0, 4)


def test_ignore_only_truth_with_prediction_on_ignore_is_empty_empty():
    gt = _gt()
    gt[2:4, 2:4] = IGNORE
    pred = gt == IGNORE
    i, u = iou_counts(pred, gt)
    assert (i, u) == (0, 0) and iou(i, u) == 1.0


def test_multi_target_regions_are_one_target():
    gt = _gt()
    gt[0:2, 0:2] = 1  # target A: 4 px
    gt[4:6, 6:8] = 1  # target B: 4 px, disjoint
    one = np.zeros((6, 8), bool)
    one[0:2, 0:2] = True  # finds A only
    both = gt == 1
    assert iou_counts(one, gt) == (4, 8)
    assert iou(*iou_counts(one, gt)) == 0.5
    assert iou_counts(both, gt) == (8, 8)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        iou_counts(np.zeros((2, 2), bool), np.zeros((3, 2), np.uint8))


def test_iou_rejects_impossible_counts():
    with pytest.raises(ValueError):
        iou(5, 3)


def test_giou_is_mean_and_ciou_is_ratio_of_sums():
    inter = [1, 0, 90]
    union = [2, 10, 100]
    assert giou([iou(i, u) for i, u in zip(inter, union, strict=True)]) == pytest.approx(
        (0.5 + 0.0 + 0.9) / 3
    )
    assert ciou(inter, union) == pytest.approx(91 / 112)


def test_ciou_all_empty_is_one_and_giou_of_nothing_is_an_error():
    assert ciou([0, 0], [0, 0]) == 1.0
    with pytest.raises(ValueError):
        giou([])


@pytest.mark.parametrize("ignore", [False, True])
def test_many_predictions_count_as_pixel_by_pixel_enumeration(ignore):
    rng = np.random.default_rng(7)
    gt = (rng.random((9, 11)) < 0.4).astype(np.uint8)
    if ignore:
        gt[rng.random(gt.shape) < 0.2] = IGNORE
    preds = [rng.random(gt.shape) < p for p in (0.0, 0.1, 0.5, 0.9, 1.0)] + [gt == 1]
    brute = []
    for pred in preds:  # each pixel on its own, LISA's rules spelled out
        inter = union = 0
        for y in range(gt.shape[0]):
            for x in range(gt.shape[1]):
                if gt[y, x] == IGNORE:
                    continue
                inter += bool(pred[y, x] and gt[y, x] == 1)
                union += bool(pred[y, x] or gt[y, x] == 1)
        brute.append((inter, union))
    assert iou_counts_many(preds, gt) == brute == [iou_counts(p, gt) for p in preds]
    assert iou_counts_many([], gt) == []
    with pytest.raises(ValueError, match="shape"):
        iou_counts_many([np.zeros((2, 2), bool)], gt)
