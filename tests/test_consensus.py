"""Consensus within subsets, against brute force over every subset."""

import dataclasses
from fractions import Fraction
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from named_settings import evaluate_named, per_sample_named, settings_of

from rescue import consensus, selection
from rescue.evaluation import evaluate
from rescue.records import CandidateRecord, SampleRecord


def _pool(rng, m, p_fail=0.2):
    a = rng.random((m, m)).round(1)  # coarse values so ties happen
    ious = np.triu(a, 1) + np.triu(a, 1).T + np.eye(m)
    ok = rng.random(m) > p_fail
    ious[~ok] = 0
    ious[:, ~ok] = 0
    return ious, ok


def _brute_pick(ious, ok, subset):
    """The consensus pick of one subset, written out the long way in exact arithmetic."""
    scores = {}
    for c in subset:
        if not ok[c]:
            continue
        others = [o for o in subset if o != c and ok[o]]
        total = sum((Fraction(str(ious[c, o])) for o in others), Fraction(0))
        scores[c] = total / len(others) if others else Fraction(0)
    w = np.zeros(len(ok))
    if not scores:  # nothing has a mask: every member is as (un)likely
        w[list(subset)] = 1 / len(subset)
        return w
    best = max(scores.values())
    winners = [c for c, s in scores.items() if s == best]
    w[winners] = 1 / len(winners)
    return w


@pytest.mark.parametrize("trial", range(40))
def test_exact_weights_equal_brute_force(trial):
    rng = np.random.default_rng(trial)
    m = int(rng.integers(1, 8))
    ious, ok = _pool(rng, m)
    for n in range(1, m + 1):
        subs = list(combinations(range(m), n))
        brute = np.mean([_brute_pick(ious, ok, s) for s in subs], axis=0)
        got = consensus.best_of_n_within(ious, ok, n, draws=10_000, rng=rng)
        np.testing.assert_allclose(got, brute, atol=1e-12)
        np.testing.assert_allclose(consensus.prefix_within(ious, ok, n),
                                   _brute_pick(ious, ok, tuple(range(n))), atol=1e-12)


def test_monte_carlo_is_close_to_exact_on_large_pools():
    rng = np.random.default_rng(7)
    ious, ok = _pool(rng, 14)
    values = rng.random(14)
    exact = np.mean([_brute_pick(ious, ok, s) for s in combinations(range(14), 5)], axis=0)
    mc = consensus.best_of_n_within(ious, ok, 5, draws=4000, rng=rng)
    # expected value of the pick: the MC standard error with 4000 draws is below 0.005 here
    assert abs(mc @ values - exact @ values) < 0.02
    assert mc.sum() == pytest.approx(1.0)


def test_two_masks_cannot_outvote_each_other():
    ious = np.array([[1, 0.3, 0.3], [0.3, 1, 0.9], [0.3, 0.9, 1]])
    ok = np.ones(3, bool)
    # over the pool, 1 and 2 agree; within a pair every member ties, so N=2 is a coin flip
    assert np.argmax(consensus.pool_scores(ious, ok)) == 1
    np.testing.assert_allclose(consensus.best_of_n_within(ious, ok, 2, draws=99, rng=None),
                               [1 / 3] * 3)


def _rec(sid, cands, masks, mask_iou, target=10):
    return SampleRecord(sample_id=sid, dataset="d", query="q", height=4, width=4,
                        target_area=target, simulated=True, candidates=cands, masks=masks,
                        mask_iou=mask_iou)


def test_duplicates_agree_and_failures_have_no_vote():
    cands = [CandidateRecord(index=0, mask_key="a", intersection=5, union=10, iou=0.5),
             CandidateRecord(index=1, mask_key="b", intersection=9, union=10, iou=0.9),
             CandidateRecord(index=2, mask_key="a", duplicate_of=0, intersection=5, union=10,
                             iou=0.5),
             CandidateRecord(index=3, failed_stage="plan", union=10)]
    rec = _rec("s", cands, ["a", "b"], [[1.0, 0.2], [0.2, 1.0]])
    ious, ok = consensus.candidate_ious(rec)
    assert ok.tolist() == [True, True, True, False]
    assert ious[0, 2] == 1.0 and ious[0, 1] == 0.2 and ious[3].sum() == 0
    np.testing.assert_allclose(consensus.pool_scores(ious, ok)[:3], [0.6, 0.2, 0.6])
    # N = M: the duplicated mask wins, shared between its two candidates
    t = per_sample_named([rec], 4, "consensus")
    assert t.expected_iou.iloc[0] == pytest.approx(0.5)
    # N = 2, prefix: candidates 0 and 1 tie (each other's only voter)
    t = per_sample_named([rec], 2, "consensus", estimator="prefix")
    assert t.expected_iou.iloc[0] == pytest.approx(0.7)


def test_pool_level_consensus_would_overstate_small_n():
    rng = np.random.default_rng(3)
    recs = []
    for s in range(30):  # one good mask proposed 3 times among 5 scattered bad ones
        cands = [CandidateRecord(index=k, mask_key=f"m{k}", intersection=int(k < 3) * 9,
                                 union=10, iou=0.9 * (k < 3)) for k in range(8)]
        for c in cands[1:3]:
            c.mask_key = "m0"
        keys = ["m0"] + [f"m{k}" for k in range(3, 8)]
        pair = np.eye(6) + np.triu(rng.random((6, 6)) * 0.1, 1)
        pair = np.maximum(pair, pair.T)
        for c in cands:
            c.consensus = 1.0 if c.mask_key == "m0" else 0.0  # what the pool says
        recs.append(_rec(f"s{s}", cands, keys, pair.round(6).tolist()))
    df = evaluate_named(recs, [2, 8], ["consensus", "oracle"], bootstrap=0)
    at = df.set_index(["estimator", "selector", "n"]).giou
    # at N = 8 the triple wins every time; at N = 2 it only wins when two copies are drawn
    assert at["best_of_n", "consensus", 8] == pytest.approx(0.9)
    assert at["best_of_n", "consensus", 2] < at["best_of_n", "oracle", 2] - 0.05


def _random_records(rng, count, m):
    """Records with `m` distinct masks each: random pairwise IoUs, I and U per candidate."""
    recs = []
    for s in range(count):
        ious, _ = _pool(rng, m, p_fail=0.0)
        inter = rng.integers(0, 10, m)
        cands = [CandidateRecord(index=k, mask_key=f"m{k}", intersection=int(inter[k]),
                                 union=10 + int(rng.integers(0, 5)), iou=0.0)
                 for k in range(m)]
        for c in cands:
            c.iou = c.intersection / c.union
        recs.append(_rec(f"s{s}", cands, [f"m{k}" for k in range(m)], ious.tolist()))
    return recs


@pytest.mark.parametrize("pilot", [32, 6])
def test_reported_monte_carlo_se_matches_the_error_against_enumeration(pilot):
    """Where consensus is drawn, not enumerated, `giou_mc_se`/`ciou_mc_se` are within a factor
    of 2 of the root-mean-square error against the exact (enumerated) value, over seeds; also
    with a small pilot (`consensus_pilot`), whose variance estimate sets the draws."""
    recs = _random_records(np.random.default_rng(11), 12, 10)  # C(10, 4) = 210 subsets
    kw = dict(bootstrap=0, by_tag=False)

    def row(df):
        return df[(df.selector == "consensus") & (df.estimator == "best_of_n")].iloc[0]

    exact = row(evaluate_named(recs, [4], ["consensus"], consensus_draws=210, **kw))
    assert bool(exact.exact) and exact.giou_mc_se == 0 and exact.ciou_mc_se == 0
    errors, ses = [], []
    for seed in range(60):
        got = row(evaluate_named(recs, [4], ["consensus"], seed=seed, consensus_draws=16,
                                 consensus_pilot=pilot, consensus_se=0.01,
                                 consensus_max_draws=100, **kw))
        assert not bool(got.exact)
        errors.append((got.giou - exact.giou, got.ciou - exact.ciou))
        ses.append((got.giou_mc_se, got.ciou_mc_se))
    rms = np.sqrt(np.mean(np.square(errors), axis=0))
    mean_se = np.mean(ses, axis=0)
    assert np.all(mean_se > 0)
    ratio = rms / mean_se
    assert np.all((ratio > 0.5) & (ratio < 2.0)), (rms, mean_se)


def test_draws_grow_to_the_target_and_enumerate_when_that_is_cheaper():
    rng = np.random.default_rng(5)
    ious, ok = _pool(rng, 10, p_fail=0.0)
    values = np.stack([rng.random(10), rng.random(10) + 1, rng.random(10)])
    exact = consensus.best_of_n_within(ious, ok, 4, draws=210, rng=None)
    loose = consensus.estimate_best_of_n(ious, ok, 4, values, pilot=16, target_var=1.0,
                                         max_draws=100, rng=np.random.default_rng(0))
    assert loose.draws == 16 and not loose.exact  # the pilot meets a loose target
    tight = consensus.estimate_best_of_n(ious, ok, 4, values, pilot=16, target_var=1e-5,
                                         max_draws=150, rng=np.random.default_rng(0))
    assert tight.draws == 150  # capped
    assert tight.cov[2, 2] < loose.cov[2, 2]
    # the pilot is the plain best_of_n draw: same generator, same weights
    np.testing.assert_allclose(loose.weights, consensus.best_of_n_within(
        ious, ok, 4, draws=16, rng=np.random.default_rng(0)))
    enumerated = consensus.estimate_best_of_n(ious, ok, 4, values, pilot=16, target_var=1e-9,
                                              max_draws=10_000, rng=np.random.default_rng(0))
    assert enumerated.exact and not enumerated.cov.any()
    np.testing.assert_allclose(enumerated.weights, exact, atol=1e-12)


def test_a_pilot_below_the_enumeration_threshold_draws_only_what_the_target_asks():
    rng = np.random.default_rng(6)
    ious, ok = _pool(rng, 12, p_fail=0.0)
    values = np.stack([rng.random(12), rng.random(12) + 1, rng.random(12)])
    kw = dict(pilot=256, max_draws=10_000, rng=np.random.default_rng(1))
    loose = consensus.estimate_best_of_n(ious, ok, 5, values, target_var=1.0, first=8, **kw)
    assert loose.draws == 8  # C(12, 5) = 792 > 256: drawn, and 8 meet a loose target
    assert consensus.estimate_best_of_n(ious, ok, 5, values, target_var=0.0, first=8,
                                        **kw).draws == 256  # no target: the fixed count
    target = 2e-4
    tight = consensus.estimate_best_of_n(ious, ok, 5, values, target_var=target, first=8, **kw)
    assert tight.draws > 8 and tight.cov[2, 2] <= 2 * target


def _group(seed: int, samples: int, m: int,
           target_var: float = 4e-4) -> list[consensus.SubsetConsensus]:
    rng = np.random.default_rng(seed)
    out = []
    for s in range(samples):
        ious, ok = _pool(rng, m)
        out.append(consensus.SubsetConsensus(ious, ok, f"s{s}", 3, consensus.Draws(
            pilot=64, target_var=target_var, max_draws=600, first=16)))
    return out


@pytest.mark.parametrize("target_var", [4e-4, 4e-3, 1.0])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 9, 10])
def test_batched_estimates_equal_the_per_sample_loop(n, target_var):
    """`estimate_all` (`ConsensusBatch`: one product for every sample's first draws, the draw
    counts and the estimates of those the first draws suffice for at once) gives each sample's
    own `estimate` bit for bit: the same draws from the same generator, the same weights, draw
    counts and covariance; samples that ask for more draws, and pools of another size, go on
    alone. Each path is taken: N = 1 and 2 in closed form, N = 9 enumerated, N = M the pool,
    N = 3 and 5 drawn (the loose target: the first 16 draws suffice; the tight: most draw
    more or enumerate; between: both)."""
    group = _group(n, 12, 10, target_var)
    odd = _group(50 + n, 1, 7)  # another pool size in the same call: the loop
    rng = np.random.default_rng(n)
    values = [np.stack([rng.random(len(g.ok)), rng.random(len(g.ok)) + 1,
                        rng.random(len(g.ok))]) for g in group]
    got = consensus.estimate_all(group, n, values)
    want = [g.estimate(n, v) for g, v in zip(group, values, strict=True)]
    if n in (3, 5):
        first = {w.draws == 16 for w in want}
        assert first == ({True} if target_var == 1.0 else
                         {False} if target_var == 4e-4 else {True, False}), first
    else:
        assert all(w.exact for w in want)
    for a, b in zip(got, want, strict=True):
        assert a.draws == b.draws
        np.testing.assert_array_equal(a.weights, b.weights)
        np.testing.assert_array_equal(a.cov, b.cov)
    mixed = consensus.estimate_all([*group[:2], *odd], n, [*values[:2], np.stack(
        [np.ones(7)] * 3)])
    np.testing.assert_allclose(mixed[2].weights, odd[0].estimate(n, np.stack(
        [np.ones(7)] * 3)).weights)


@pytest.mark.parametrize("trial", range(30))
def test_closed_forms_at_n_1_and_2_equal_brute_force(trial):
    """N = 1 and 2 in closed form (`closed_form`) are the exact arithmetic over every subset,
    with ties and failed candidates, also where C(M, 2) is above the enumeration threshold
    (there the weights were drawn); bit for bit the enumeration's mean of `pick_weights`; and
    batched over samples, each sample's own."""
    rng = np.random.default_rng(100 + trial)
    m = int(rng.integers(3, 41))
    pools = [_pool(rng, m, p_fail=p) for p in (0.0, 0.3, 0.9)]
    for n in (1, 2):
        for ious, ok in pools:
            subs = list(combinations(range(m), n))
            got = consensus.closed_form(ious, ok, n)
            brute = np.mean([_brute_pick(ious, ok, s) for s in subs], axis=0)
            np.testing.assert_allclose(got, brute, rtol=0, atol=1e-15)
            np.testing.assert_array_equal(
                got, consensus.pick_weights(ious, ok, np.array(subs)).mean(axis=0))
            # the sample's estimate is the closed form, exact, wherever it would have drawn
            est = consensus.estimate_best_of_n(ious, ok, n, np.ones((3, m)), pilot=2,
                                               target_var=1e-6, max_draws=10,
                                               rng=np.random.default_rng(0), first=2)
            assert est.exact and not est.cov.any()
            np.testing.assert_array_equal(est.weights, got)
        batched = consensus.closed_form(np.stack([p[0] for p in pools]),
                                        np.stack([p[1] for p in pools]), n)
        for row, (ious, ok) in zip(batched, pools, strict=True):
            np.testing.assert_array_equal(row, consensus.closed_form(ious, ok, n))
    assert consensus.closed_form(*pools[0], 3) is None and consensus.closed_form(*pools[0], m) \
        is None


def test_batched_prefixes_equal_each_samples_own():
    group = _group(4, 9, 8)
    batch = consensus.ConsensusBatch(tuple(group))
    for n in range(1, 10):
        np.testing.assert_array_equal(batch.prefix(n), np.stack([g.prefix(n) for g in group]))
    mixed = consensus.ConsensusBatch((*group[:2], *_group(5, 2, 8, target_var=1.0)))
    assert not mixed.uniform  # Draws differ: one by one, the same
    np.testing.assert_array_equal(mixed.prefix(3), np.stack([g.prefix(3) for g in mixed.subs]))


def test_smallest_keys_are_the_subsets_argpartition_draws():
    """`_smallest` (partition and compare) marks the set argpartition's first N index, rows
    with a tie at the N-th key included (argpartition decides those)."""
    rng = np.random.default_rng(8)
    keys = rng.random((50, 12))
    keys[3, [2, 7]] = keys[3].min() / 2  # two equal smallest: a tie at N = 1
    keys[4] = 0.5  # every key tied
    for n in range(1, 13):
        want = np.zeros(keys.shape, bool)
        np.put_along_axis(want, np.argpartition(keys, n - 1, axis=-1)[:, :n], True, axis=-1)
        got = consensus._smallest(keys, n)
        np.testing.assert_array_equal(got, want)
        assert (got.sum(axis=1) == n).all()


class _Alone:
    """A sample's `SubsetConsensus` without its class's `batch`: the evaluation scores it one
    sample at a time."""

    def __init__(self, sub):
        self.best_of_n, self.estimate, self.prefix = sub.best_of_n, sub.estimate, sub.prefix


def test_the_evaluation_batched_equals_one_sample_at_a_time():
    """Every row of the table, consensus's exact and drawn N alike and their SE columns, is the
    same whether the evaluation scores consensus through `ConsensusBatch` or sample by sample
    (a class that offers no `batch`); a record without pairwise IoUs keeps the pool's."""
    rng = np.random.default_rng(21)
    recs = _random_records(rng, 25, 12)
    recs[4].masks, recs[4].mask_iou = [], []  # scored over the pool
    settings = settings_of([1, 2, 3, 4, 6, 12], ["consensus", "first"], consensus_draws=64,
                           consensus_pilot=16, consensus_se=0.01, bootstrap=50)

    def alone(record, seed, draws):
        sub = consensus.SubsetConsensus.of(record, seed, draws)
        return None if sub is None else _Alone(sub)

    slow = dataclasses.replace(selection.CONSENSUS, within=alone)
    loop = dataclasses.replace(settings, selectors=(slow, selection.FIRST), primary=slow)
    batched, one_by_one = evaluate(recs, settings), evaluate(recs, loop)
    assert not batched.exact.all() and batched.exact.any()
    pd.testing.assert_frame_equal(batched, one_by_one)


def test_candidate_ious_gather_each_candidates_mask_and_zero_those_without():
    """The (M, M) IoUs equal the pairwise IoUs of the candidates' masks, looked up one by one;
    a candidate without a mask (failed, or its key missing) has none and 0 everywhere."""
    rng = np.random.default_rng(9)
    for trial in range(20):
        d = int(rng.integers(1, 6))
        keys = [f"k{j}" for j in range(d)]
        a = np.triu(rng.random((d, d)).round(6), 1)
        pair = a + a.T + np.eye(d)
        cands = []
        for k in range(int(rng.integers(0, 9))):
            kind = rng.integers(4)
            cands.append(CandidateRecord(index=k, failed_stage="execute") if kind == 0 else
                         CandidateRecord(index=k, mask_key="gone") if kind == 1 else
                         CandidateRecord(index=k, mask_key=keys[int(rng.integers(d))]))
        ious, ok = consensus.candidate_ious(_rec(f"s{trial}", cands, keys, pair.tolist()))
        want_ok = [c.ok and c.mask_key in keys for c in cands]
        assert ok.tolist() == want_ok and ious.shape == (len(cands), len(cands))
        for i, ci in enumerate(cands):
            for j, cj in enumerate(cands):
                want = (pair[keys.index(ci.mask_key), keys.index(cj.mask_key)]
                        if want_ok[i] and want_ok[j] else 0.0)
                assert ious[i, j] == want
