"""Multi-N evaluation over records, against brute-force enumeration and naive bootstraps."""

import logging
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from named_settings import evaluate_named, per_sample_named

from rescue import selection
from rescue.evaluation import CIOU_DEFINITION, COLUMNS, COST_COLUMNS, failure_summary
from rescue.records import CandidateRecord, SampleRecord

ALL = ["verifier", "executor", "consensus", "first", "random", "oracle"]


def _cand(index, inter, union, **kw):
    iou = 1.0 if union == 0 else inter / union
    return CandidateRecord(index=index, intersection=inter, union=union, iou=iou, **kw)


def _record(sid, target, cands, tags=(), error=None):
    return SampleRecord(sample_id=sid, dataset="t", query="q", height=10, width=10,
                        target_area=target, simulated=True, candidates=list(cands),
                        tags=list(tags), error=error)


def random_records(rng, count, m_choices=(4, 5, 6), tags=("long", "short")):
    """Consistent pools: I <= min(area, target), U = area + target - I; all failure kinds."""
    out = []
    for s in range(count):
        target = int(rng.integers(0, 50))
        m = int(rng.choice(m_choices))
        cands = []
        for k in range(m):
            u = rng.random()
            if u < 0.1:
                cands.append(CandidateRecord(index=k, failed_stage="execute", error="Boom: x"))
                continue
            if u < 0.15:
                cands.append(CandidateRecord(index=k, failed_stage="plan", error="bad JSON"))
                continue
            area = int(rng.integers(0, 60))
            inter = int(rng.integers(0, min(area, target) + 1))
            kw = dict(
                verifier_score=float(np.round(rng.random(), 1)),
                executor_score=float(np.round(rng.random(), 1)) if rng.random() < 0.8 else None,
                consensus=float(np.round(rng.random(), 1)),
            )
            if u < 0.2:
                kw.update(verifier_score=None, failed_stage="verify", error="HTTP 500: x")
            cands.append(_cand(k, inter, area + target - inter, **kw))
        out.append(_record(f"s{s:03d}", target, cands, tags=[tags[s % len(tags)]]))
    return out


def brute(records, n, sel, estimator, seed=0):
    """Per-sample E[I], E[U], E[IoU] by enumerating every N-subset (or the prefix)."""
    ei, eu, eiou = [], [], []
    for r in records:
        if r.error is not None or not r.candidates:
            ei.append(0.0), eu.append(float(r.target_area)), eiou.append(0.0)
            continue
        m = len(r.candidates)
        s = selection.get(sel).scores(r.candidates, key=r.sample_id, seed=seed)
        counts = [(c.intersection, c.union) if c.ok else (0, r.target_area) for c in r.candidates]
        subs = [tuple(range(min(n, m)))] if estimator == "prefix" else list(
            combinations(range(m), min(n, m)))
        i = u = v = 0.0
        for sub in subs:
            top = max(s[k] for k in sub)
            tied = [k for k in sub if s[k] == top]
            for k in tied:
                ik, uk = counts[k]
                i += ik / len(tied) / len(subs)
                u += uk / len(tied) / len(subs)
                v += (1.0 if uk == 0 else ik / uk) / len(tied) / len(subs)
        ei.append(i), eu.append(u), eiou.append(v)
    return np.array(ei), np.array(eu), np.array(eiou)


def _row(df, estimator, sel, n, subset="all"):
    hit = df[(df.estimator == estimator) & (df.selector == sel) & (df.n == n)
             & (df.subset == subset)]
    assert len(hit) == 1
    return hit.iloc[0]


def test_columns_attrs_and_row_grid():
    recs = random_records(np.random.default_rng(0), 12)
    df = evaluate_named(recs, [1, 2, 4], ALL, bootstrap=50)
    assert list(df.columns) == COLUMNS + COST_COLUMNS
    assert len(df) == 3 * 2 * 6 * 3  # subsets (all, long, short) x estimators x selectors x N
    assert set(df.subset) == {"all", "long", "short"}
    assert df.attrs["ciou_definition"] == CIOU_DEFINITION and df.attrs["simulated"] is True
    assert (df.ciou_definition == CIOU_DEFINITION).all()


@pytest.mark.parametrize("estimator", ["best_of_n", "prefix"])
def test_matches_brute_force_enumeration(estimator):
    recs = random_records(np.random.default_rng(1), 30)
    recs.append(_record("failed", 7, [], error="corrupt image"))
    df = evaluate_named(recs, [1, 2, 3, 4, 5, 6], ALL, estimators=[estimator], bootstrap=0,
                  by_tag=False, seed=3)
    for sel in ALL:
        for n in range(1, 7):
            i, u, v = brute(recs, n, sel, estimator, seed=3)
            row = _row(df, estimator, sel, n)
            assert row.giou == pytest.approx(v.mean(), abs=1e-12)
            assert row.ciou == pytest.approx(i.sum() / u.sum(), abs=1e-12)
            table = per_sample_named(recs, n, sel, estimator=estimator, seed=3)
            np.testing.assert_allclose(table.expected_iou, v, atol=1e-12)
            np.testing.assert_allclose(table.expected_intersection, i, atol=1e-9)
            np.testing.assert_allclose(table.expected_union, u, atol=1e-9)


def test_hand_computed_example():
    # sample a: target 10; candidates (I, U, verifier): (10, 10, .9), (5, 20, .8), failed
    # sample b: target 0 (empty truth); candidates: empty prediction (IoU 1), (0, 4, .9)
    a = _record("a", 10, [_cand(0, 10, 10, verifier_score=0.9),
                          _cand(1, 5, 20, verifier_score=0.8),
                          CandidateRecord(index=2, failed_stage="execute", error="x")])
    b = _record("b", 0, [_cand(0, 0, 0, verifier_score=0.5), _cand(1, 0, 4, verifier_score=0.9)])
    df = evaluate_named([a, b], [1, 2], ["verifier"], bootstrap=0)
    n1 = _row(df, "best_of_n", "verifier", 1)
    # N=1: a: mean IoU (1 + .25 + 0) / 3; b: (1 + 0) / 2
    assert n1.giou == pytest.approx(((1 + 0.25) / 3 + 0.5) / 2)
    # E[ΣI] = (10 + 5 + 0)/3 + 0 = 5; E[ΣU] = (10 + 20 + 10)/3 + (0 + 4)/2
    assert n1.ciou == pytest.approx(5 / (40 / 3 + 2))
    # N=2 in a: pairs {0,1}->0, {0,2}->0, {1,2}->1: IoU (1 + 1 + .25)/3; in b the pair picks 1
    n2 = _row(df, "best_of_n", "verifier", 2)
    assert n2.giou == pytest.approx((2.25 / 3 + 0) / 2)
    assert n2.ciou == pytest.approx((25 / 3) / (40 / 3 + 4))
    p2 = _row(df, "prefix", "verifier", 2)
    assert p2.giou == pytest.approx((1 + 0) / 2)
    assert p2.ciou == pytest.approx(10 / (10 + 4))


def test_failed_samples_count_as_zero_and_are_not_dropped():
    ok = _record("ok", 10, [_cand(0, 10, 10, verifier_score=1.0)])
    bad = _record("bad", 30, [], error="ValueError: corrupt image")
    df = evaluate_named([ok, bad], [1], ["verifier"], bootstrap=0)
    row = _row(df, "best_of_n", "verifier", 1)
    assert row.num_samples == 2 and row.num_failed_samples == 1
    assert row.giou == pytest.approx(0.5)
    assert row.ciou == pytest.approx(10 / 40)  # the failed sample's union is its target area
    t = per_sample_named([ok, bad], 1, "verifier")
    assert list(t.failed) == [False, True] and list(t.expected_iou) == [1.0, 0.0]


def test_oracle_is_an_upper_bound_at_every_n():
    recs = random_records(np.random.default_rng(2), 60, m_choices=(8,))
    df = evaluate_named(recs, range(1, 9), ALL, bootstrap=0)
    for est in ("best_of_n", "prefix"):
        for n in range(1, 9):
            best = _row(df, est, "oracle", n).giou
            for sel in ALL:
                assert best >= _row(df, est, sel, n).giou - 1e-12


def test_limiting_cases():
    rng = np.random.default_rng(4)
    recs = random_records(rng, 40, m_choices=(6,))
    df = evaluate_named(recs, [1, 6], ALL, bootstrap=0, by_tag=False)
    # N = 1 is the pool mean for every selector
    assert np.ptp(df[(df.estimator == "best_of_n") & (df.n == 1)].giou) < 1e-12
    # N = M is the argmax (ties shared): the prefix of all M is the same thing
    full = df[df.n == 6].pivot(index="selector", columns="estimator", values="giou")
    np.testing.assert_allclose(full.best_of_n, full.prefix, atol=1e-12)
    # the prefix at N = 1 is the first candidate, whatever the selector
    assert np.ptp(df[(df.estimator == "prefix") & (df.n == 1)].giou) < 1e-12


def test_random_selector_is_the_pool_mean_at_every_n():
    rng = np.random.default_rng(5)
    recs = [_record(f"s{s}", 20, [_cand(k, int(rng.integers(0, 21)), 20 + int(rng.integers(0, 9)))
                                  for k in range(7)]) for s in range(50)]
    mean = per_sample_named(recs, 1, "random").expected_iou.to_numpy()
    for n in (2, 4, 7):
        np.testing.assert_allclose(per_sample_named(recs, n, "random").expected_iou, mean)
    oracle_gain = per_sample_named(recs, 7, "oracle").expected_iou.to_numpy() - mean
    assert oracle_gain.mean() > 0.1


def test_n_beyond_every_pool_is_skipped_and_short_pools_are_clamped(caplog):
    small = _record("small", 10, [_cand(0, 5, 10, verifier_score=0.1),
                                  _cand(1, 10, 10, verifier_score=0.9)])
    big = _record("big", 10, [_cand(k, k, 10, verifier_score=k / 10) for k in range(4)])
    with caplog.at_level(logging.WARNING, logger="rescue.evaluation"):
        df = evaluate_named([small, big], [1, 4, 8, 4], ["verifier"], bootstrap=0)
    assert "N=[8]" in caplog.text
    assert sorted(set(df.n)) == [1, 4]
    row = _row(df, "best_of_n", "verifier", 4)
    assert row.num_short_pools == 1 and _row(df, "best_of_n", "verifier", 1).num_short_pools == 0
    assert row.giou == pytest.approx((1.0 + 0.3) / 2)  # small: its argmax; big: its argmax


def test_all_samples_failed_reports_zeros():
    recs = [_record("a", 5, [], error="x"), _record("b", 0, [], error="y")]
    df = evaluate_named(recs, [1, 4], ["verifier"], bootstrap=10)
    assert len(df) == 4 and (df.giou == 0).all() and (df.num_failed_samples == 2).all()


def test_subsets_by_tag_equal_separate_evaluations():
    recs = random_records(np.random.default_rng(6), 40)
    df = evaluate_named(recs, [1, 2, 4], ALL, bootstrap=0)
    long_only = evaluate_named([r for r in recs if "long" in r.tags], [1, 2, 4], ALL, bootstrap=0,
                         by_tag=False)
    mine = df[df.subset == "long"].drop(columns="subset").reset_index(drop=True)
    theirs = long_only.drop(columns="subset").reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, theirs)
    assert _row(df, "best_of_n", "oracle", 2, "long").num_samples == 20


def test_bootstrap_equals_a_naive_loop_and_is_reproducible():
    recs = random_records(np.random.default_rng(7), 25)
    draws, ci = 200, 0.9
    df = evaluate_named(recs, [2], ["verifier", "oracle"], estimators=["best_of_n"],
                        bootstrap=draws, ci=ci, seed=11, by_tag=False)
    pd.testing.assert_frame_equal(df, evaluate_named(recs, [2], ["verifier", "oracle"],
                                               estimators=["best_of_n"], bootstrap=draws, ci=ci,
                                               seed=11, by_tag=False))
    rng = np.random.default_rng(11)  # evaluate draws its resamples from default_rng(seed)
    idx = rng.integers(0, len(recs), size=(draws, len(recs)))
    q = [(1 - ci) / 2, 1 - (1 - ci) / 2]
    for sel in ("verifier", "oracle"):
        i, u, v = brute(recs, 2, sel, "best_of_n")
        g = [v[row].mean() for row in idx]
        c = [i[row].sum() / u[row].sum() for row in idx]
        row = _row(df, "best_of_n", sel, 2)
        np.testing.assert_allclose([row.giou_lo, row.giou_hi], np.quantile(g, q), atol=1e-12)
        np.testing.assert_allclose([row.ciou_lo, row.ciou_hi], np.quantile(c, q), atol=1e-12)
        assert row.giou_lo <= row.giou <= row.giou_hi
        assert row.ciou_lo < row.ciou_hi


def test_no_bootstrap_gives_nan_intervals():
    df = evaluate_named(random_records(np.random.default_rng(8), 5), [1], ["first"], bootstrap=0)
    assert df[["giou_lo", "giou_hi", "ciou_lo", "ciou_hi"]].isna().all().all()


def test_bad_arguments_are_clear_errors():
    recs = random_records(np.random.default_rng(9), 3)
    with pytest.raises(ValueError, match="valid selectors"):
        evaluate_named(recs, [1], ["verfier"])
    with pytest.raises(ValueError, match="valid estimators"):
        evaluate_named(recs, [1], ["first"], estimators=["best_of_m"])
    with pytest.raises(ValueError, match="no records"):
        evaluate_named([], [1], ["first"])
    with pytest.raises(ValueError, match="more than once"):
        evaluate_named(recs + recs[:1], [1], ["first"])
    with pytest.raises(ValueError, match="n_grid"):
        evaluate_named(recs, [0, 1], ["first"])
    with pytest.raises(ValueError, match="ci"):
        evaluate_named(recs, [1], ["first"], ci=1.5)


def test_failure_summary():
    recs = [
        _record("a", 5, [CandidateRecord(index=0, failed_stage="plan", error="bad JSON: {"),
                         CandidateRecord(index=1, failed_stage="execute", error="Timeout: 30 s"),
                         CandidateRecord(index=2, failed_stage="execute", error="Timeout: 31 s"),
                         CandidateRecord(index=3, failed_stage="verify", error=None),
                         _cand(4, 1, 5)]),
        _record("b", 5, [], error="ValueError: corrupt image"),
    ]
    s = failure_summary(recs)
    assert s["samples"] == 2 and s["failed_samples"] == 1 and s["candidates"] == 5
    assert s["failed_candidates"] == 4 and s["candidates_without_mask"] == 3
    assert s["by_stage"] == {"execute": 2, "plan": 1, "verify": 1}
    assert s["by_reason"] == {"execute: Timeout": 2, "plan: bad JSON": 1, "verify: unknown": 1}
    assert s["sample_errors"] == {"ValueError": 1}


def test_record_order_does_not_change_any_number():
    recs = random_records(np.random.default_rng(9), 25)
    a = evaluate_named(recs, [1, 2, 4], ALL, bootstrap=100, seed=3)
    b = evaluate_named(recs[::-1], [1, 2, 4], ALL, bootstrap=100, seed=3)
    pd.testing.assert_frame_equal(a, b)
