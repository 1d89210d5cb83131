"""The pairwise arena: the subset winner against brute force over cached comparisons; on a
cached run, the swap to a pairwise (or accept/reject) verifier calls the verifier alone, only
for what it needs, and never sends a near-duplicate pair."""

import asyncio
from itertools import combinations

import numpy as np
import pytest

from rescue import arena, expected_cost
from rescue.cache import Cache, CacheMiss
from rescue.consensus import Draws
from rescue.cost import Cost, CostRates, ModelRates
from rescue.datasets.synthetic import SyntheticDataset
from rescue.models.simulated import SimulatedExecutor, SimulatedPlanner, SimulatedVerifier
from rescue.pipeline import Pipeline
from rescue.records import CandidateRecord, SampleRecord
from rescue.selection import ARENA


def _record(seed: int, m: int = 7, d: int = 5, costs: bool = False) -> SampleRecord:
    """m candidates over d distinct masks (duplicates, failures), random cached comparisons with
    some pairs skipped or unanswered and some exact 1/2s; `costs`: each call's cost too."""
    rng = np.random.default_rng(seed)
    digests = [f"m{k}" for k in range(d)]
    cands = []
    for k in range(m):
        c = CandidateRecord(index=k, union=10)
        if rng.random() < 0.15:
            c.failed_stage, c.error = "plan", "plan:empty_prompt"
        else:
            c.mask_key = digests[int(rng.integers(d))]
        cands.append(c)
    comps = []
    for i, j in combinations(range(d), 2):
        if rng.random() < 0.2:
            continue  # a near-duplicate pair: never asked
        for a, b in ((i, j), (j, i)):
            u = rng.random()
            p = None if u < 0.1 else 0.5 if u < 0.2 else float(rng.integers(0, 2))
            comps.append([a, b, p])
            if costs:
                comps[-1].append(Cost(prompt_tokens=int(rng.integers(100, 300)), calls=1,
                                      completion_tokens=int(rng.integers(1, 50))).to_json())
    return SampleRecord(sample_id=f"s{seed}", dataset="toy", query="q", height=4, width=4,
                        target_area=3, simulated=True, candidates=cands, masks=digests,
                        mask_iou=np.eye(d).tolist(), comparisons=comps)


def _brute_winners(rec: SampleRecord, subset: tuple[int, ...]) -> np.ndarray:
    """The module's rule, restated with loops over the cached answers."""
    m = len(rec.candidates)
    pref: dict[tuple[str, str], list[float]] = {}
    for i, j, p in rec.comparisons:
        if p is not None:
            a, b = rec.masks[i], rec.masks[j]
            pref.setdefault((a, b), []).append(p)
            pref.setdefault((b, a), []).append(1 - p)
    working = [k for k in subset if rec.candidates[k].ok]
    w = np.zeros(m)
    if not working:
        w[list(subset)] = 1 / len(subset)
        return w
    scores = {}
    for k in working:
        a = rec.candidates[k].mask_key
        cop = borda = 0.0
        for o in working:
            b = rec.candidates[o].mask_key
            if o == k or a == b or (a, b) not in pref:
                continue
            q = float(np.mean(pref[(a, b)]))
            cop += (q > 0.5) - (q < 0.5)
            borda += q
        scores[k] = (cop, borda)
    best = max(scores.values())
    top = [k for k, s in scores.items() if s[0] == best[0] and abs(s[1] - best[1]) < 1e-9]
    w[top] = 1 / len(top)
    return w


@pytest.mark.parametrize("seed", range(15))
def test_the_subset_winner_matches_brute_force_over_the_cached_comparisons(seed):
    rec = _record(seed)
    weights = ARENA.within(rec, 0, Draws(pilot=10_000))
    m = len(rec.candidates)
    values = np.stack([np.arange(m, dtype=float)] * 3)
    for n in range(1, m + 1):
        want = np.mean([_brute_winners(rec, s) for s in combinations(range(m), n)], axis=0)
        np.testing.assert_allclose(weights.best_of_n(n), want, atol=1e-12)
        est = weights.estimate(n, values)
        assert est.exact
        np.testing.assert_allclose(est.weights, want, atol=1e-12)
        np.testing.assert_allclose(weights.prefix(n), _brute_winners(rec, tuple(range(n))),
                                   atol=1e-12)
    pool = _brute_winners(rec, tuple(range(m)))
    answer = ARENA.answer(rec)
    if pool.any() and any(c.ok for c in rec.candidates):
        assert pool[[c.index for c in rec.candidates].index(answer)] > 0


def test_many_subsets_are_drawn_with_a_standard_error():
    rec = _record(3, m=14, d=9)
    weights = ARENA.within(rec, 0, Draws(pilot=64))
    values = np.stack([np.linspace(0, 1, 14)] * 3)
    est = weights.estimate(6, values)
    assert not est.exact and est.cov[2, 2] > 0


def _brute_spend(rec: SampleRecord, subset: tuple[int, ...]) -> tuple[int, int, int]:
    """(masks shown, calls, tokens) of an arena over `subset`: every cached comparison between
    two distinct masks of its working candidates, restated with sets."""
    drawn = {rec.masks.index(rec.candidates[k].mask_key) for k in subset
             if rec.candidates[k].ok}
    asked = [c for c in rec.comparisons if c[0] in drawn and c[1] in drawn]
    shown = {c[0] for c in asked} | {c[1] for c in asked}
    return len(shown), len(asked), sum(Cost.from_json(c[3]).tokens for c in asked)


@pytest.mark.parametrize("seed", range(15))
def test_the_arenas_expected_calls_and_tokens_match_enumeration(seed):
    rng = np.random.default_rng(100 + seed)
    m, d = int(rng.integers(2, 9)), int(rng.integers(1, 6))
    rec = _record(seed, m=m, d=d, costs=True)
    calls = expected_cost.PairCalls.of(rec)
    if not rec.comparisons:
        assert calls is None
        return
    for n in range(1, m + 1):
        want = np.mean([_brute_spend(rec, s) for s in combinations(range(m), n)], axis=0)
        got = calls.spend(n, "best_of_n")
        assert got.exact
        np.testing.assert_allclose([got.masks, got.calls, got.cost.tokens], want, atol=1e-9)
        first = calls.spend(n, "prefix")
        np.testing.assert_allclose([first.masks, first.calls, first.cost.tokens],
                                   _brute_spend(rec, tuple(range(n))), atol=1e-9)


def test_records_without_comparison_costs_give_nan_verify_columns_not_a_wrong_number():
    old = _record(2)  # comparisons as older versions stored them: [i, j, p]
    new = _record(2, costs=True)
    for c in [*old.candidates, *new.candidates]:
        c.cost["plan"] = Cost(prompt_tokens=10, completion_tokens=5, calls=1).to_json()
    assert old.comparisons and expected_cost.PairCalls.of(old) is None
    table = expected_cost.sample_costs([old, new], [3], ["best_of_n"], None, ["pairwise"])
    got, var = table[("pairwise", "best_of_n", 3)]
    col = expected_cost.QUANTITIES.index
    for q in ("verify_masks", "verify_calls", "verify_tokens", "total_tokens"):
        assert np.isnan(got[0, col(q)]) and np.isfinite(got[1, col(q)])
    assert got[0, col("plan_tokens")] == got[1, col("plan_tokens")] > 0
    assert not var.any()  # the arena's cost is exact
    # a GPU-seconds conversion charges the arena's calls (pairs), not its masks
    rates = CostRates(verifier=ModelRates(gpu_s_per_call=2.0, gpu_s_per_token=0.001))
    priced, _ = expected_cost.sample_costs([new], [3], ["best_of_n"], rates,
                                           ["pairwise"])[("pairwise", "best_of_n", 3)]
    spend = expected_cost.PairCalls.of(new).spend(3, "best_of_n")
    assert spend.calls != spend.masks
    assert priced[0, col("gpu_s")] == pytest.approx(2.0 * spend.calls
                                                    + 0.001 * spend.cost.tokens)


def _pipeline(verifier, cache):
    return Pipeline(SimulatedPlanner(p_correct=0.5, box_jitter=0.02), SimulatedExecutor(noise=0.02),
                    verifier, cache, max_n=8, progress=False)


class Spy(SimulatedVerifier):
    """The simulated pairwise verifier, recording each pair of masks it is shown."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.shown: list[tuple[np.ndarray, np.ndarray]] = []
        self.verified = 0

    async def compare(self, sample, first, second):
        self.shown.append((first, second))
        return await super().compare(sample, first, second)

    async def verify(self, sample, mask):
        self.verified += 1
        return await super().verify(sample, mask)


def _iou(a, b):
    u = (a | b).sum()
    return (a & b).sum() / u if u else 1.0


def test_swapping_to_a_variant_calls_only_the_verifier_and_never_a_near_duplicate(tmp_path):
    data = SyntheticDataset(num_samples=4, seed=1, difficulty="easy")
    ids = data.sample_ids()
    cache = Cache(tmp_path / "cache")
    first = _pipeline(SimulatedVerifier(noise=0.3), cache)
    base = asyncio.run(first.run(data, ids))
    assert first.stats.requests["plan"] > 0 and first.stats.requests["execute"] > 0

    spy = Spy(noise=0.3, shape="pairwise")
    swapped = _pipeline(spy, cache)
    recs = asyncio.run(swapped.run(data, ids))
    req = swapped.stats.requests
    assert req["plan"] == 0 and req["execute"] == 0 and req["verify"] == 0
    near = 0
    needed = 0
    for r in recs:
        ious = np.asarray(r.mask_iou).reshape(len(r.masks), len(r.masks))
        near += int(((ious > arena.SKIP_IOU) & ~np.eye(len(r.masks), dtype=bool)).sum())
        needed += len(arena.pairs_to_compare(ious))
        assert len(r.comparisons) == len(arena.pairs_to_compare(ious))
    assert near > 0, "the test needs near-duplicate masks in some pool"
    assert req["compare"] == needed == len(spy.shown)
    assert all(_iou(a, b) <= arena.SKIP_IOU + 1e-6 for a, b in spy.shown)
    assert spy.verified == 0
    assert [r.masks for r in recs] == [r.masks for r in base]

    again = _pipeline(Spy(noise=0.3, shape="pairwise"), cache)
    asyncio.run(again.run(data, ids))
    assert again.stats.model_calls == 0  # every comparison cached per ordered pair

    accept = _pipeline(Spy(noise=0.3, shape="accept"), cache)
    acc = asyncio.run(accept.run(data, ids))
    assert accept.stats.requests["plan"] == accept.stats.requests["execute"] == 0
    assert accept.stats.requests["verify"] == sum(len(r.masks) for r in acc)
    assert {c.verifier_score for r in acc for c in r.candidates if c.ok} <= {0.0, 1.0}

    offline = _pipeline(SimulatedVerifier(noise=0.2, shape="pairwise"),
                        Cache(tmp_path / "cache", offline=True))
    with pytest.raises(CacheMiss, match="comparison of masks"):
        asyncio.run(offline.run(data, ids))
