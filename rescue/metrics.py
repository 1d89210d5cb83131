"""Segmentation metrics with LISA's rules.

Intersection and union are kept as pixel counts (not only their ratio) so cIoU, which sums them
over the dataset, can be recomputed for any selection of candidates. Ground-truth pixels labelled
IGNORE (255, ReasonSeg's "ignore" shapes) count in neither: a prediction that covers them is
neither rewarded nor punished there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from rescue.sample import IGNORE


def iou_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """(intersection, union) of a predicted mask and a ground truth of 0 / 1 / IGNORE labels.

    Every ground-truth pixel labelled 1 is target, whichever object it belongs to (several
    targets are one region); IGNORE pixels are dropped from both counts.
    """
    return iou_counts_many([pred], gt)[0]


def iou_counts_many(preds: Iterable[np.ndarray], gt: np.ndarray) -> list[tuple[int, int]]:
    """`iou_counts` of each prediction against one ground truth, whose target and valid pixels
    are found once (a sample's distinct masks, up to max_n of them). The union is counted as
    |pred ∩ valid| + |target| − |pred ∩ target| (the target lies inside the valid pixels)."""
    gt = np.asarray(gt)
    target = gt == 1
    n_target = int(np.count_nonzero(target))
    invalid = gt == IGNORE
    valid = None if not invalid.any() else ~invalid
    out = []
    for pred in preds:
        pred = np.asarray(pred, dtype=bool)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
        inter = int(np.count_nonzero(pred & target))
        covered = int(np.count_nonzero(pred if valid is None else pred & valid))
        out.append((inter, covered + n_target - inter))
    return out


def iou(intersection: float, union: float) -> float:
    """I / U; an empty union means prediction and truth are both empty, which is right: 1.0."""
    if union < 0 or intersection < 0 or intersection > union:
        raise ValueError(f"invalid counts: intersection={intersection}, union={union}")
    return 1.0 if union == 0 else float(intersection) / float(union)


def giou(ious: Sequence[float] | np.ndarray) -> float:
    """Mean per-sample IoU: every sample weighs the same, whatever its object's size."""
    arr = np.asarray(ious, dtype=float)
    if arr.size == 0:
        raise ValueError("gIoU of no samples is undefined")
    return float(arr.mean())


def ciou(
    intersections: Sequence[float] | np.ndarray, unions: Sequence[float] | np.ndarray
) -> float:
    """ΣI / ΣU over the dataset: large objects weigh more. ΣU = 0 (all empty, all right) → 1.0."""
    i = np.asarray(intersections, dtype=float)
    u = np.asarray(unions, dtype=float)
    if i.shape != u.shape:
        raise ValueError(f"intersections {i.shape} and unions {u.shape} differ in shape")
    total_u = float(u.sum())
    return 1.0 if total_u == 0 else float(i.sum()) / total_u
