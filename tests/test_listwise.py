"""Listwise Set-of-Marks: the subset's pick against brute force over the cached choices; a run
with the listwise verifier on a cached run asks exactly the sets its evaluation reads."""

import asyncio
from itertools import combinations

import numpy as np
import pytest

from rescue import expected_cost, listwise
from rescue.cache import Cache, CacheMiss
from rescue.consensus import Draws
from rescue.cost import Cost
from rescue.datasets.synthetic import SyntheticDataset
from rescue.models.simulated import SimulatedExecutor, SimulatedPlanner, SimulatedVerifier
from rescue.pipeline import Pipeline
from rescue.records import CandidateRecord, SampleRecord
from rescue.selection import LISTWISE

K = 3


def _record(seed: int, m: int = 7, d: int = 5) -> SampleRecord:
    rng = np.random.default_rng(seed)
    digests = [f"m{k}" for k in range(d)]
    ious = np.round(rng.random((d, d)), 2)
    ious = np.triu(ious, 1) + np.triu(ious, 1).T + np.eye(d)
    cands = []
    for k in range(m):
        c = CandidateRecord(index=k, union=10)
        if rng.random() < 0.15:
            c.failed_stage, c.error = "execute", "execute:no_mask"
        else:
            c.mask_key = digests[int(rng.integers(d))]
        cands.append(c)
    rec = SampleRecord(sample_id=f"s{seed}", dataset="toy", query="q", height=4, width=4,
                       target_area=3, simulated=True, candidates=cands, masks=digests,
                       mask_iou=ious.tolist())
    # the verifier's answer to every set it could be shown: a fixed noisy liking per mask,
    # plus a failed call now and then
    liking = rng.random(d)
    rec.choices = [[list(s), None if rng.random() < 0.1 else max(s, key=lambda p: liking[p])]
                   for size in range(2, K + 1) for s in combinations(range(d), size)]
    return rec


def _brute_ranked(rec: SampleRecord, subset) -> tuple[list[int], list[int]]:
    """(working candidates of `subset`, their distinct masks by consensus within it, best
    first), restated with loops."""
    pos = [rec.masks.index(c.mask_key) if c.ok else -1 for c in rec.candidates]
    ious = np.asarray(rec.mask_iou)
    work = [k for k in subset if pos[k] >= 0]
    cons = {}
    for k in work:
        others = [o for o in work if o != k]
        cons[k] = np.mean([ious[pos[k], pos[o]] for o in others]) if others else 0.0
    best = {}
    for k in work:
        best[pos[k]] = max(best.get(pos[k], -1.0), cons[k])
    return work, sorted(best, key=lambda p: (-round(best[p], 9), p))


def _brute(rec: SampleRecord, subset) -> np.ndarray:
    m = len(rec.candidates)
    pos = [rec.masks.index(c.mask_key) if c.ok else -1 for c in rec.candidates]
    work, ranked = _brute_ranked(rec, subset)
    w = np.zeros(m)
    if not work:
        w[list(subset)] = 1 / len(subset)
        return w
    shown = tuple(sorted(ranked[:K]))
    answers = {tuple(c[0]): c[1] for c in rec.choices}
    mask = shown[0] if len(shown) == 1 else answers[shown]
    if mask is None:
        mask = ranked[0]
    win = [k for k in work if pos[k] == mask]
    w[win] = 1 / len(win)
    return w


def _with_costs(rec: SampleRecord, seed: int) -> SampleRecord:
    rng = np.random.default_rng(seed)
    for c in rec.choices:
        c.append(Cost(prompt_tokens=200 + 50 * len(c[0]), calls=1,
                      completion_tokens=int(rng.integers(1, 80))).to_json())
    return rec


def _brute_spend(rec: SampleRecord, subset) -> tuple[int, int, int]:
    """(masks shown, calls, tokens) of the one listwise call over `subset`, if any."""
    shown = tuple(sorted(_brute_ranked(rec, subset)[1][:K]))
    if len(shown) < 2:
        return 0, 0, 0
    cost = {tuple(c[0]): Cost.from_json(c[2]) for c in rec.choices}[shown]
    return len(shown), 1, cost.tokens


@pytest.mark.parametrize("seed", range(12))
def test_the_listwise_expected_calls_and_tokens_match_enumeration(seed):
    rec = _with_costs(_record(seed), seed)
    m = len(rec.candidates)
    for n in range(1, m + 1):
        want = np.mean([_brute_spend(rec, s) for s in combinations(range(m), n)], axis=0)
        got = expected_cost.listwise_spend(rec, n, "best_of_n", seed=0, draws=Draws(10_000))
        assert got.exact
        np.testing.assert_allclose([got.masks, got.calls, got.cost.tokens], want, atol=1e-9)
        first = expected_cost.listwise_spend(rec, n, "prefix", seed=0, draws=Draws(10_000))
        np.testing.assert_allclose([first.masks, first.calls, first.cost.tokens],
                                   _brute_spend(rec, tuple(range(n))), atol=1e-9)


def test_drawn_subsets_give_the_listwise_cost_of_those_draws_with_its_variance():
    rec = _with_costs(_record(5, m=12, d=6), 5)
    n, draws = 5, Draws(pilot=40)
    got = expected_cost.listwise_spend(rec, n, "best_of_n", seed=3, draws=draws)
    subs = listwise.subsets(12, n, seed=3, sample_id=rec.sample_id, draws=40)
    per = np.array([_brute_spend(rec, tuple(s)) for s in subs], dtype=float)
    assert len(subs) == 40 and not got.exact
    np.testing.assert_allclose([got.masks, got.calls, got.cost.tokens], per.mean(axis=0),
                               atol=1e-9)
    np.testing.assert_allclose(np.diag(got.cov), per.var(axis=0, ddof=1) / 40, atol=1e-9)
    # records of older versions carry no cost per set: no number rather than a wrong one
    bare = _record(5, m=12, d=6)
    assert expected_cost.listwise_spend(bare, n, "best_of_n", seed=3, draws=draws) is None


@pytest.mark.parametrize("seed", range(12))
def test_the_subset_pick_matches_brute_force_over_the_cached_choices(seed):
    rec = _record(seed)
    weights = LISTWISE.within(rec, 0, Draws(pilot=10_000))
    m = len(rec.candidates)
    values = np.stack([np.arange(m, dtype=float)] * 3)
    for n in range(1, m + 1):
        want = np.mean([_brute(rec, s) for s in combinations(range(m), n)], axis=0)
        est = weights.estimate(n, values)
        assert est.exact
        np.testing.assert_allclose(est.weights, want, atol=1e-12)
        np.testing.assert_allclose(weights.prefix(n), _brute(rec, tuple(range(n))), atol=1e-12)


def test_the_run_asks_exactly_the_sets_its_evaluation_reads(tmp_path):
    data = SyntheticDataset(num_samples=3, seed=2, difficulty="easy")
    ids = data.sample_ids()
    cache = Cache(tmp_path / "cache")
    plan = listwise.Plan((1, 2, 4, 8), seed=0, draws=16)

    def pipe(verifier, c=cache):
        return Pipeline(SimulatedPlanner(p_correct=0.4), SimulatedExecutor(), verifier, c,
                        max_n=8, progress=False, plan=plan)

    asyncio.run(pipe(SimulatedVerifier(noise=0.3)).run(data, ids))
    swapped = pipe(SimulatedVerifier(noise=0.3, shape="listwise", top_k=3))
    recs = asyncio.run(swapped.run(data, ids))
    req = swapped.stats.requests
    assert req["plan"] == req["execute"] == req["verify"] == 0
    needed = [listwise.sets_needed(r, plan.n_grid, top_k=3, seed=0, draws=16) for r in recs]
    assert req["choose"] == sum(map(len, needed)) > 0
    assert all(len(s) <= 3 for sets in needed for s in sets)
    for r in recs:
        w = LISTWISE.within(r, 0, Draws(pilot=16))
        for n in plan.n_grid:
            w.estimate(min(n, len(r.candidates)), np.zeros((3, len(r.candidates))))
            w.prefix(n)
    # another grid needs sets never asked: named, not guessed
    with pytest.raises(listwise.MissingChoice, match="no listwise answer"):
        for r in recs:
            LISTWISE.within(r, 1, Draws(pilot=16)).estimate(5, np.zeros((3, 8)))
    offline = Pipeline(SimulatedPlanner(p_correct=0.4), SimulatedExecutor(),
                       SimulatedVerifier(noise=0.1, shape="listwise", top_k=3),
                       Cache(tmp_path / "cache", offline=True), max_n=8, progress=False,
                       plan=plan)
    with pytest.raises(CacheMiss, match="listwise choice among masks"):
        asyncio.run(offline.run(data, ids))
