"""Synthetic inputs for the reporting tests: a metrics frame, records, a sample with masks."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rescue.records import CandidateRecord, SampleRecord
from rescue.reporting.overlays import OverlayItem
from rescue.sample import IGNORE, Sample

SELECTORS = ("verifier", "executor", "consensus", "first", "random", "oracle")
NS = (1, 2, 4, 8, 16)


def metrics_frame(subsets: tuple[str, ...] | None = None, seed: int = 0) -> pd.DataFrame:
    """Rows per (subset, estimator, selector, N); gIoU rises with N, the oracle on top."""
    rng = np.random.default_rng(seed)
    rows = []
    for subset in subsets or ("all",):
        for est in ("prefix", "best_of_n"):  # deliberately not in display order
            for k, sel in enumerate(SELECTORS):
                for n in NS:
                    base = 0.3 + 0.02 * k + (0.04 if sel == "oracle" else 0.01) * np.log2(n)
                    g, c = float(base + rng.uniform(0, 0.01)), float(base - 0.02)
                    rows.append({"subset": subset, "estimator": est, "selector": sel, "n": n,
                                 "giou": g, "ciou": c, "giou_lo": g - 0.03, "giou_hi": g + 0.03,
                                 "ciou_lo": c - 0.04, "ciou_hi": c + 0.04, "num_samples": 40,
                                 "num_failed_samples": 2})
    df = pd.DataFrame(rows)
    return df if subsets else df.drop(columns="subset")


def make_sample(sample_id: str = "s0", height: int = 90, width: int = 160) -> Sample:
    """A textured image with a square target (plus an ignore band) and a disc distractor."""
    yy, xx = np.mgrid[:height, :width]
    image = np.stack([(xx * 255 // width), (yy * 255 // height), np.full_like(xx, 90)], -1)
    image = image.astype(np.uint8)
    gt = np.zeros((height, width), np.uint8)
    gt[20:50, 30:70] = 1
    gt[18:20, 30:70] = IGNORE
    image[20:50, 30:70] = (220, 40, 40)
    disc = (yy - 45) ** 2 + (xx - 120) ** 2 < 15 ** 2
    image[disc] = (40, 40, 220)
    return Sample(sample_id=sample_id, query="the red square left of the blue disc", image=image,
                  gt=gt, dataset="fake")


def candidate_masks(sample: Sample) -> dict[int, np.ndarray]:
    target = sample.gt == 1
    yy, xx = np.mgrid[:sample.height, :sample.width]
    disc = (yy - 45) ** 2 + (xx - 120) ** 2 < 15 ** 2
    shifted = np.roll(target, 12, axis=1)
    return {0: target, 1: disc, 2: shifted, 4: np.zeros_like(target), 5: target[:, ::-1].copy()}


def sample_record(sample: Sample, simulated: bool = True) -> SampleRecord:
    """Candidates 0..6: #3 failed planning, #6 duplicates #0's mask."""
    from rescue.metrics import iou, iou_counts

    masks = candidate_masks(sample)
    scores = {0: 0.9, 1: 0.7, 2: 0.8, 4: 0.1, 5: 0.5}
    cands = []
    for i in range(7):
        if i == 3:
            cands.append(CandidateRecord(index=3, failed_stage="plan",
                                         error="parse:no_json: model said hi"))
            continue
        root = 0 if i == 6 else i
        inter, union = iou_counts(masks[root], sample.gt)
        cands.append(CandidateRecord(
            index=i, box=[28.0, 18.0, 72.0, 52.0], points=[[50.0, 35.0]],
            verifier_score=scores[root], executor_score=0.5 + 0.05 * i,
            duplicate_of=0 if i == 6 else None, intersection=inter, union=union,
            iou=iou(inter, union), area=int(masks[root].sum())))
    return SampleRecord(sample_id=sample.sample_id, dataset="fake", query=sample.query,
                        height=sample.height, width=sample.width,
                        target_area=int((sample.gt == 1).sum()), simulated=simulated,
                        candidates=cands)


def overlay_item(sample_id: str = "s0", selected: int | None = 2) -> OverlayItem:
    s = make_sample(sample_id)
    return OverlayItem(sample=s, record=sample_record(s), masks=candidate_masks(s),
                       selected=selected)
