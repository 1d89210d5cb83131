"""Aggregators against a brute-force reference: every N-subset of small pools enumerated.

The reference restates each rule directly on 2-D masks (IoU computed from pixels, not read from
the record), so a slip in the vectorised pool, the memo or the subset draws shows up here.
"""

from itertools import combinations

import numpy as np
import pytest

from rescue import aggregation, masks
from rescue.aggregation import AggregationParams, Pool
from rescue.evaluation import evaluate
from rescue.records import CandidateRecord, SampleRecord
from rescue.scoring import pair_iou
from rescue.selection import VERIFIER
from rescue.settings import EvaluationSettings
from rescue.truth import SampleTruth

H = W = 14


def _blob(rng, empty=False):
    m = np.zeros((H, W), bool)
    if not empty:
        y, x = rng.integers(0, H - 5, size=2)
        h, w = rng.integers(3, 7, size=2)
        m[y:y + h, x:x + w] = True
    return m


def make_pool(seed: int, m: int = 6, p_empty: float = 0.2, p_fail: float = 0.15,
              p_dup: float = 0.3):
    """A record, its truth and each candidate's 2-D mask (None: failed)."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((H, W), np.uint8)
    gt[3:9, 4:10] = 1
    gt[8, 4:10] = 255  # an ignore band
    target, ignore = gt == 1, gt == 255
    cand_masks: list[np.ndarray | None] = []
    for k in range(m):
        u = rng.random()
        if u < p_fail:
            cand_masks.append(None)
        elif u < p_fail + p_empty:
            cand_masks.append(_blob(rng, empty=True))
        elif k and u < p_fail + p_empty + p_dup and any(c is not None for c in cand_masks):
            prev = [c for c in cand_masks if c is not None]
            base = prev[int(rng.integers(len(prev)))].copy()
            if rng.random() < 0.5 and base.any():  # a near-duplicate: one pixel more
                ys, xs = np.nonzero(~base)
                base[ys[0], xs[0]] = True
            cand_masks.append(base)
        else:
            cand_masks.append(target.copy() if rng.random() < 0.3 else _blob(rng))
    digests, rles, cands = [], {}, []
    for k, cm in enumerate(cand_masks):
        c = CandidateRecord(index=k, intersection=0, union=int(target.sum()))
        if cm is None:
            c.failed_stage, c.error = "execute", "execute:no_mask"
        else:
            rle = masks.encode(cm)
            d = masks.digest(rle)
            if d not in rles:
                digests.append(d)
                rles[d] = rle
            c.mask_key = d
            c.area = int(cm.sum())
            pred = cm & ~ignore
            c.intersection, c.union = int((pred & target).sum()), int((pred | target).sum())
            c.iou = c.intersection / c.union if c.union else 1.0
            c.verifier_score = None if rng.random() < 0.1 else round(float(rng.random()), 6)
        cands.append(c)
    rec = SampleRecord(sample_id=f"s{seed}", dataset="toy", query="q", height=H, width=W,
                       target_area=int(target.sum()), simulated=True, candidates=cands,
                       masks=digests, mask_iou=pair_iou([rles[d] for d in digests]).tolist())
    truth = SampleTruth(rec.sample_id, masks.encode(target), masks.encode(ignore), rles)
    return rec, truth, cand_masks, target, ignore


def _iou2(a, b):
    u = (a | b).sum()
    return (a & b).sum() / u if u else 1.0


def ref_vote(ms, p: AggregationParams, output: str):
    votes = [x for x in ms if x is not None]
    if not votes:
        return None
    empties = [v for v in votes if not v.any()]
    if len(empties) / len(votes) >= p.empty_share:
        return np.zeros((H, W), bool)
    groups: list[list[np.ndarray]] = []
    for v in (v for v in votes if v.any()):
        for g in groups:
            if round(_iou2(g[0], v), 6) >= p.cluster_iou:
                g.append(v)
                break
        else:
            groups.append([v])
    size = max(len(g) for g in groups)
    win = next(g for g in groups if len(g) == size)
    if size / len(votes) < p.min_share:
        return np.zeros((H, W), bool)
    if output == "majority":
        return np.mean(win, axis=0) >= p.majority
    agree = [np.mean([round(_iou2(a, b), 6) for j, b in enumerate(win) if j != i])
             if len(win) > 1 else 0.0 for i, a in enumerate(win)]
    return win[int(np.argmax(agree))]


def ref_fusion(ms, scores, p):
    drawn = [(x, s) for x, s in zip(ms, scores, strict=True) if x is not None]
    if not drawn:
        return None
    w = np.array([0.0 if s is None else s for _, s in drawn])
    if w.sum() == 0:
        w = np.ones(len(drawn))
    share = sum(wi * x for wi, (x, _) in zip(w, drawn, strict=True)) / w.sum()
    return share >= p.fusion_threshold - 1e-12


def ref_accept(ms, scores, p):
    ok = [(s, x) for x, s in zip(ms, scores, strict=True)
          if x is not None and s is not None and s >= p.accept_score and x.any()]
    ok.sort(key=lambda t: -t[0])  # stable: earlier first on a tie
    kept: list[np.ndarray] = []
    for _, x in ok:
        if all((x & k).sum() / min(x.sum(), k.sum()) <= p.max_iom for k in kept):
            kept.append(x)
    return np.any(kept, axis=0) if kept else np.zeros((H, W), bool)


def _score(pred, target, ignore, target_area):
    if pred is None:
        pred = np.zeros((H, W), bool)
    pred = pred & ~ignore
    i = float((pred & target).sum())
    u = float(pred.sum()) + target_area - i
    return np.array([i, u, i / u if u else 1.0])


def reference(name, ms, scores, p):
    if name in ("vote_best", "vote_majority"):
        return ref_vote(ms, p, "best" if name == "vote_best" else "majority")
    if name == "verifier_fusion":
        return ref_fusion(ms, scores, p)
    return ref_accept(ms, scores, p)


NAMES = ("vote_best", "vote_majority", "verifier_fusion", "agent_accept")


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("name", NAMES)
def test_every_aggregator_equals_brute_force_over_all_n_subsets(seed, name):
    rec, truth, ms, target, ignore = make_pool(seed)
    p = AggregationParams(min_share=0.3 if seed % 3 == 0 else 0.2)
    agg = aggregation.named([name], p)[0]
    pool = Pool.of(rec, truth)
    scores = [c.verifier_score for c in rec.candidates]
    m = len(ms)
    for n in range(1, m + 1):
        want = np.mean([_score(reference(name, [ms[i] for i in sub], [scores[i] for i in sub],
                                         p), target, ignore, rec.target_area)
                        for sub in combinations(range(m), n)], axis=0)
        got = aggregation.estimate(agg, pool, n, estimator="best_of_n", seed=0,
                                   sample_id=rec.sample_id)
        assert got.exact
        np.testing.assert_allclose(got.values, want, atol=1e-12, err_msg=f"N={n}")
        first = aggregation.estimate(agg, pool, n, estimator="prefix", seed=0,
                                     sample_id=rec.sample_id)
        np.testing.assert_allclose(first.values, _score(reference(
            name, ms[:n], scores[:n], p), target, ignore, rec.target_area), atol=1e-12)


def test_the_empty_vote_wins_at_half_the_votes_and_not_below():
    rec, truth, _, _, _ = make_pool(0, m=4, p_empty=0.0, p_fail=0.0, p_dup=0.0)
    pool = Pool.of(rec, truth)
    # make candidates 0 and 1 empty votes: with them 2 of 4 votes (0.5) -> empty answer
    empty = masks.encode(np.zeros((H, W), bool))
    d = masks.digest(empty)
    for c in rec.candidates[:2]:
        c.mask_key, c.area = d, 0
    rec.masks = [d, *[c.mask_key for c in rec.candidates[2:]]]
    truth = SampleTruth(truth.sample_id, truth.target, truth.ignore, {**truth.masks, d: empty})
    rec.mask_iou = pair_iou([truth.masks[k] for k in rec.masks]).tolist()
    pool = Pool.of(rec, truth)
    vote = aggregation.AGGREGATORS["vote_best"]
    assert not vote.combine(pool, np.arange(4)).any()
    assert vote.combine(pool, np.array([0, 2, 3])).any()  # 1 of 3 empty: a mask wins


def test_monte_carlo_where_subsets_are_many_reports_an_se_that_covers_the_exact_value():
    rec, truth, *_ = make_pool(5, m=12)
    pool = Pool.of(rec, truth)
    for name in NAMES:
        exact = aggregation.estimate(aggregation.named([name], AggregationParams(draws=1000))[0],
                                     pool, 5, estimator="best_of_n", seed=0, sample_id="x")
        mc = aggregation.estimate(aggregation.named([name], AggregationParams(draws=64))[0],
                                  pool, 5, estimator="best_of_n", seed=0, sample_id="x")
        assert exact.exact and not mc.exact
        se = np.sqrt(np.diag(mc.cov))
        assert se[2] > 0 or exact.values[2] == mc.values[2]
        assert abs(mc.values[2] - exact.values[2]) <= 4 * se[2] + 1e-12, name


def test_evaluate_reports_aggregators_beside_selectors_from_the_stored_truth():
    pools = [make_pool(s) for s in range(6)]
    recs = [p[0] for p in pools]
    truths = {p[1].sample_id: p[1] for p in pools}
    settings = EvaluationSettings(n_grid=(1, 3), selectors=(VERIFIER,), bootstrap=0,
                                  aggregators=aggregation.named(["vote_majority"]))
    metrics = evaluate(recs, settings, truths=truths)
    row = metrics[(metrics.subset == "all") & (metrics.estimator == "best_of_n")
                  & (metrics.selector == "vote_majority") & (metrics.n == 3)].iloc[0]
    p = AggregationParams()
    want = np.mean([np.mean([_score(ref_vote([ms[i] for i in sub], p, "majority"), t, ig,
                                    rec.target_area)[2]
                             for sub in combinations(range(len(ms)), 3)])
                    for rec, _, ms, t, ig in pools])
    assert row.exact and row.giou == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match=r"masks\.jsonl"):
        evaluate(recs, settings)


def test_bad_aggregation_settings_fail_with_one_line():
    with pytest.raises(ValueError, match="unknown aggregators"):
        aggregation.named(["vote"])
    with pytest.raises(ValueError, match="cluster_iou"):
        AggregationParams.from_config({"cluster_iou": 1.5})
    with pytest.raises(ValueError, match=r"unknown selection\.aggregation keys"):
        AggregationParams.from_config({"iou": 0.8})
