"""The exact expected cost at N equals brute-force enumeration over every N-subset (and the first
N), on small pools with duplicate prompts, duplicate masks and failures."""

import itertools
import math

import numpy as np
import pytest
from named_settings import evaluate_named

from rescue import cost, expected_cost
from rescue.cost import Cost, CostRates, ModelRates
from rescue.records import CandidateRecord, SampleRecord


def _pool(rng: np.random.Generator, m: int) -> SampleRecord:
    """A pool of m candidates over few prompts and fewer masks: duplicates and failures."""
    n_prompts = int(rng.integers(1, m + 1))
    prompt_mask = {p: (f"m{int(rng.integers(0, max(1, n_prompts - 1)))}"
                       if rng.random() < 0.8 else None) for p in range(n_prompts)}
    cands, seen_p, seen_m = [], set(), set()
    for i in range(m):
        c = CandidateRecord(index=i)
        c.cost["plan"] = Cost(prompt_tokens=500 if i == 0 else 0, calls=int(i == 0),
                              completion_tokens=int(rng.integers(5, 40))).to_json()
        if rng.random() < 0.15:  # an invalid hypothesis: no prompt, nothing executed
            c.failed_stage = "plan"
        else:
            p = int(rng.integers(n_prompts))
            c.prompt_key = f"p{p}"
            if c.prompt_key not in seen_p:
                seen_p.add(c.prompt_key)
                c.cost["execute"] = Cost(prompts=1, calls=1).to_json()
            mk = prompt_mask[p]
            if mk is None:
                c.failed_stage = "execute"
            else:
                c.mask_key = mk
                if mk not in seen_m:
                    seen_m.add(mk)
                    c.cost["verify"] = Cost(prompt_tokens=300, calls=1,
                                            completion_tokens=int(rng.integers(10, 200))
                                            ).to_json()
        cands.append(c)
    return SampleRecord(sample_id="s", dataset="d", query="q", height=1, width=1,
                        target_area=1, simulated=True, candidates=cands)


def _brute(rec: SampleRecord, subset: tuple[int, ...]) -> dict[str, float]:
    cands = [rec.candidates[i] for i in subset]
    plan = max(Cost.from_json(c.cost.get("plan")).prompt_tokens for c in rec.candidates)
    plan += sum(Cost.from_json(c.cost.get("plan")).completion_tokens for c in cands)
    prompts = {c.prompt_key for c in cands if c.prompt_key is not None and c.failed_stage != "plan"}
    masks = {c.mask_key for c in cands if c.mask_key is not None}
    verify_cost = {c.mask_key: Cost.from_json(c.cost["verify"]).tokens
                   for c in rec.candidates if "verify" in c.cost}
    tokens = sum(verify_cost[k] for k in masks)
    return {"plan_tokens": plan, "execute_prompts": len(prompts),
            "execute_encodes": float(bool(prompts)), "verify_masks": len(masks),
            "verify_tokens": tokens, "total_tokens": plan + tokens}


@pytest.mark.parametrize("seed", range(12))
def test_expected_cost_at_n_equals_enumeration_over_all_subsets(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 9))
    rec = _pool(rng, m)
    pool = expected_cost.PoolCost.of(rec)
    for n in range(1, m + 1):
        subsets = list(itertools.combinations(range(m), n))
        brute = {k: np.mean([_brute(rec, s)[k] for s in subsets]) for k in _brute(rec, (0,))}
        got = expected_cost.expected(pool, n, "best_of_n")
        for k, v in brute.items():
            assert got[k] == pytest.approx(v, abs=1e-9), (k, n, m)
        first = expected_cost.expected(pool, n, "prefix")
        for k, v in _brute(rec, tuple(range(n))).items():
            assert first[k] == pytest.approx(v, abs=1e-9), (k, n, m)


def test_a_selector_that_never_reads_the_verifier_costs_no_verification():
    rec = _pool(np.random.default_rng(3), 6)
    got = expected_cost.expected(expected_cost.PoolCost.of(rec), 4, "best_of_n", verifies=False)
    assert got["verify_masks"] == got["verify_tokens"] == 0
    assert got["total_tokens"] == got["plan_tokens"]


def test_miss_probabilities_are_the_binomial_ratio():
    for m in range(1, 9):
        for n in range(1, m + 1):
            q = expected_cost.miss_probabilities(m, n)
            want = [math.comb(m - g, n) / math.comb(m, n) for g in range(m + 1)]
            assert q == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="1 <= N <= M"):
        expected_cost.miss_probabilities(3, 4)


def test_gpu_seconds_convert_each_models_work_and_are_nan_without_rates():
    rec = _pool(np.random.default_rng(5), 5)
    pool = expected_cost.PoolCost.of(rec)
    plain = expected_cost.expected(pool, 3, "best_of_n")
    assert math.isnan(plain["gpu_s"])
    rates = CostRates(planner=ModelRates(gpu_s_per_token=0.001, gpu_s_per_call=0.5),
                      executor=ModelRates(gpu_s_per_prompt=0.02, gpu_s_per_encode=0.1),
                      verifier=ModelRates(gpu_s_per_token=0.004, gpu_s_per_call=0.05))
    got = expected_cost.expected(pool, 3, "best_of_n", rates=rates)["gpu_s"]
    want = (0.001 * plain["plan_tokens"] + 0.5 + 0.02 * plain["execute_prompts"]
            + 0.1 * plain["execute_encodes"] + 0.004 * plain["verify_tokens"]
            + 0.05 * plain["verify_masks"])
    assert got == pytest.approx(want)


def test_records_without_costs_give_nan_not_zero():
    rec = SampleRecord(sample_id="s", dataset="d", query="q", height=1, width=1, target_area=1,
                       simulated=False, candidates=[CandidateRecord(index=0)])
    got = expected_cost.expected(expected_cost.PoolCost.of(rec), 1, "best_of_n")
    assert all(math.isnan(v) for v in got.values())


def test_rates_config_refuses_unknown_keys_and_negative_rates():
    with pytest.raises(ValueError, match=r"cost\.verifier: unknown keys"):
        CostRates.from_config({"verifier": {"gpu_s_per_tok": 1}})
    with pytest.raises(ValueError, match=r"cost\.planner\.gpu_s_per_call must be"):
        CostRates.from_config({"planner": {"gpu_s_per_call": -1}})
    with pytest.raises(ValueError, match="cost: unknown keys"):
        CostRates.from_config({"sam": {}})


def test_request_costs_put_the_prompt_once_and_sum_to_the_usage():
    usage = cost.Usage(prompt_tokens=100, completion_tokens=31, reasoning_tokens=10)
    counted = cost.request_costs(usage, [10, 21], [5, 50], 2.0)
    assert [c.completion_tokens for c in counted] == [10, 21]
    assert [c.prompt_tokens for c in counted] == [100, 0] and not counted[0].estimated
    split = cost.request_costs(usage, [None, None, None], [0, 10, 20], 2.0)
    assert sum(c.completion_tokens for c in split) == 31 and split[0].estimated
    assert sum(c.reasoning_tokens for c in split) == 10
    assert sum(c.calls for c in split) == 1 and sum(c.latency_s for c in split) == 2.0
    assert cost.total(split).tokens == 131


def test_usage_reads_sdk_objects_and_json_alike():
    body = {"usage": {"prompt_tokens": 7, "completion_tokens": 5,
                      "completion_tokens_details": {"reasoning_tokens": 3}}}
    assert cost.Usage.of(body) == cost.Usage(7, 5, 3)

    class Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    obj = Obj(usage=Obj(prompt_tokens=7, completion_tokens=5, completion_tokens_details=None))
    assert cost.Usage.of(obj) == cost.Usage(7, 5, 0)
    assert cost.Usage.of({"usage": None}) == cost.Usage()


# --- the cost columns of metrics.csv --------------------------------------------------------


def _records(count, seed=0):
    rng = np.random.default_rng(seed)
    recs = []
    for s in range(count):
        rec = _pool(rng, int(rng.integers(3, 7)))
        rec.sample_id = f"s{s}"
        for c in rec.candidates:
            c.verifier_score = float(rng.random()) if c.mask_key else None
        recs.append(rec)
    return recs


def test_metrics_rows_carry_the_mean_expected_cost_with_paired_bootstrap_intervals():
    recs = _records(10)
    df = evaluate_named(recs, [1, 2, 3], ["verifier", "consensus"], bootstrap=200)
    for _, row in df[df.subset == "all"].iterrows():
        pools = [expected_cost.PoolCost.of(r) for r in recs]
        want = np.mean([expected_cost.expected(p, row.n, row.estimator,
                                               verifies=row.selector == "verifier")[
            "verify_tokens"] for p in pools])
        assert row.verify_tokens == pytest.approx(want)
        assert row.verify_tokens_lo <= row.verify_tokens <= row.verify_tokens_hi
        assert row.plan_tokens_lo <= row.plan_tokens <= row.plan_tokens_hi
        assert math.isnan(row.gpu_s) and "usage" in row.cost_units
    consensus = df[df.selector == "consensus"]
    assert (consensus.verify_tokens == 0).all() and (consensus.verify_masks == 0).all()
    verifier = df[(df.selector == "verifier") & (df.estimator == "best_of_n")
                  & (df.subset == "all")].sort_values("n")
    assert verifier.verify_masks.is_monotonic_increasing  # more drawn, more distinct masks


def test_records_without_costs_give_nan_cost_columns_and_unchanged_quality():
    recs = _records(6)
    bare = _records(6)
    for r in bare:
        for c in r.candidates:
            c.cost = {}
    a = evaluate_named(recs, [1, 2], ["verifier"], bootstrap=50)
    b = evaluate_named(bare, [1, 2], ["verifier"], bootstrap=50)
    assert b.plan_tokens.isna().all() and not a.plan_tokens.isna().any()
    quality = ["giou", "ciou", "giou_lo", "giou_hi", "ciou_lo", "ciou_hi"]
    assert a[quality].equals(b[quality])  # the cost columns draw no extra random numbers


def test_quality_against_cost_is_drawn_where_the_metrics_carry_costs(tmp_path):
    from rescue.reporting.plots import write_plots

    df = evaluate_named(_records(6), [1, 2, 3], ["verifier", "consensus"], bootstrap=20)
    paths = write_plots(df, tmp_path / "with")
    assert paths["quality_vs_cost"].stat().st_size > 0
    bare = df.assign(total_tokens=np.nan)
    assert "quality_vs_cost" not in write_plots(bare, tmp_path / "without")


def test_pareto_frontier_and_cheapest_reaching_match_brute_force():
    import pandas as pd

    from analysis.compare import cheapest_reaching, pareto_frontier

    rng = np.random.default_rng(0)
    for _ in range(20):
        k = int(rng.integers(1, 12))
        pts = pd.DataFrame({"total_tokens": rng.integers(0, 6, k).astype(float),
                            "giou": rng.integers(0, 5, k) / 4.0})
        front = pareto_frontier(pts)
        brute = [i for i in pts.index if not any(
            (pts.total_tokens[j] <= pts.total_tokens[i] and pts.giou[j] >= pts.giou[i])
            and (pts.total_tokens[j] < pts.total_tokens[i] or pts.giou[j] > pts.giou[i])
            for j in pts.index)]
        # ties (equal cost and quality) keep one representative
        assert {(pts.total_tokens[i], pts.giou[i]) for i in front.index} == \
            {(pts.total_tokens[i], pts.giou[i]) for i in brute}
        cheap = cheapest_reaching(pts, (0.5, 1.0))
        for _, row in cheap.iterrows():
            ok = pts[pts.giou >= row.fraction * pts.giou.max()]
            assert row.total_tokens == ok.total_tokens.min()
