"""What one sample's answers score: its masks checked, counted against the truth, and recorded.

Pure functions, no cache and no model: the pipeline runs the stages, then `check_masks` turns
the executor's untrusted answers into distinct decoded masks (what the verifier is shown) and
`score_sample` builds the `SampleRecord`: per candidate its prompt, scores, intersection and
union with the truth, and the pool's consensus; per sample the pairwise IoU of its masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from rescue import consensus, masks
from rescue.hypothesis import Hypothesis
from rescue.metrics import iou, iou_counts_many
from rescue.protocols import Segmentation, Verdict
from rescue.records import CandidateRecord, SampleRecord
from rescue.sample import Sample


@dataclass(frozen=True)
class SampleMasks:
    """The executor's answers of one sample, checked. `segmentations` (prompt key -> answer)
    has an unusable mask replaced by its failure; `digest_of` maps a prompt key to its mask's
    digest; `decoded` and `rles` hold each distinct mask once, in order of first appearance."""

    segmentations: dict[str, Segmentation]
    digest_of: dict[str, str]
    decoded: dict[str, np.ndarray]
    rles: dict[str, masks.Rle]


def check_masks(sample: Sample, segs: Mapping[str, Segmentation]) -> SampleMasks:
    """Decode each answer's mask once per digest; an RLE that does not decode, or a mask of
    another size than the image, becomes `execute:bad_rle` / `execute:bad_mask_shape` (the
    executor's answer is untrusted input)."""
    out = dict(segs)
    decoded: dict[str, np.ndarray] = {}
    rles: dict[str, masks.Rle] = {}
    digest_of: dict[str, str] = {}
    for pkey, seg in segs.items():
        if not (seg.ok and seg.rle is not None):
            continue
        try:
            if not isinstance(seg.rle.get("counts"), str):
                raise TypeError("counts is not a compressed RLE string")
            d = masks.digest(seg.rle)
            m = decoded[d] if d in decoded else masks.decode(seg.rle)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            out[pkey] = Segmentation(rle=None, error=f"execute:bad_rle {type(exc).__name__}: {exc}",
                                     meta=_kept_cost(seg))
            continue
        if d not in decoded:
            if m.shape != sample.gt.shape:
                out[pkey] = Segmentation(rle=None, error=(
                    f"execute:bad_mask_shape {m.shape} != image {sample.gt.shape}"),
                    meta=_kept_cost(seg))
                continue
            decoded[d], rles[d] = m, seg.rle
        digest_of[pkey] = d
    return SampleMasks(segmentations=out, digest_of=digest_of, decoded=decoded, rles=rles)


def _kept_cost(seg: Segmentation) -> dict:
    """An unusable answer still cost its call."""
    return {"cost": seg.meta["cost"]} if "cost" in seg.meta else {}


def pair_iou(rles: Sequence[masks.Rle]) -> np.ndarray:
    """Pairwise IoU of distinct masks (two empty masks agree perfectly, as LISA scores them),
    rounded to 6 decimals: what is stored is what every later computation reads."""
    if not rles:
        return np.zeros((0, 0))
    coco = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
    pair = np.asarray(mask_utils.iou(coco, coco, [0] * len(coco)), dtype=float).reshape(
        len(rles), len(rles))
    empty = np.array([masks.area(r) == 0 for r in rles])
    pair[np.ix_(empty, empty)] = 1.0
    return np.round(pair, 6)


def score_sample(sample: Sample, hyps: Sequence[Hypothesis], found: SampleMasks,
                 verdicts: Mapping[str, Verdict], *, simulated: bool) -> SampleRecord:
    """The record of one sample: every hypothesis index keeps its candidate, duplicates
    included (best-of-N stays unbiased); a candidate without a mask is an empty prediction."""
    target_area = int(sample.target.sum())
    counts = dict(zip(found.decoded, iou_counts_many(found.decoded.values(), sample.gt),
                      strict=True))
    order = list(dict.fromkeys(found.digest_of[h.prompt.key] for h in hyps
                               if h.valid and h.prompt.key in found.digest_of))
    pair = pair_iou([found.rles[d] for d in order])
    first_index: dict[str, int] = {}
    executed: set[str] = set()
    cands: list[CandidateRecord] = []
    for h in hyps:
        c = CandidateRecord(index=h.index, intersection=0, union=target_area,
                            iou=iou(0, target_area))
        cands.append(c)
        if "cost" in h.meta:
            c.cost["plan"] = h.meta["cost"]
        if h.prompt is not None:
            pj = h.prompt.to_json()
            c.text, c.box = pj.get("text"), pj.get("box")
            c.points, c.point_labels = pj.get("points"), pj.get("point_labels")
            c.prompt_key = h.prompt.key
        if not h.valid:
            c.failed_stage, c.error = "plan", h.error or "plan:empty_prompt"
            continue
        seg = found.segmentations[h.prompt.key]
        if h.prompt.key not in executed:  # executed once for the group: its first member pays
            executed.add(h.prompt.key)
            if "cost" in seg.meta:
                c.cost["execute"] = seg.meta["cost"]
        c.executor_score = seg.score
        d = found.digest_of.get(h.prompt.key)
        if d is None:
            c.failed_stage, c.error = "execute", seg.error or "execute:no_mask"
            continue
        c.mask_key, c.area = d, int(np.count_nonzero(found.decoded[d]))
        c.duplicate_of = first_index.setdefault(d, h.index)
        if c.duplicate_of == h.index:
            c.duplicate_of = None
        c.intersection, c.union = counts[d]
        c.iou = iou(*counts[d])
        v = verdicts.get(d)
        if v is None:  # a verifier not asked of one mask at a time (pairwise)
            continue
        if c.duplicate_of is None and "cost" in v.meta:  # verified once, by the first
            c.cost["verify"] = v.meta["cost"]
        c.verifier_score, c.verifier_source = v.score, v.source or None
        if not v.ok:
            c.failed_stage, c.error = "verify", v.error or "verify:no_score"
    rec = SampleRecord(sample_id=sample.sample_id, dataset=sample.dataset, query=sample.query,
                       height=sample.height, width=sample.width, target_area=target_area,
                       simulated=simulated, candidates=cands, tags=list(sample.tags),
                       masks=order, mask_iou=pair.tolist())
    pool = consensus.candidate_ious(rec)  # None when no candidate has a mask
    if pool is not None:
        for c, score in zip(cands, consensus.pool_scores(*pool), strict=True):
            if c.ok:
                c.consensus = float(score)
    return rec
