"""Verification policies (`rescue.policies`): quality and verify cost at every N equal brute
force over every N-subset (tests/reference_policies.py) on small pools with tied scores, tied
consensus, duplicate masks and failures; with k = N the consensus pre-filter is the plain
verifier; no policy costs more than the plain verifier; and they reach metrics.csv."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference_policies as ref
from named_settings import settings_of

from rescue import expected_cost, policies, selection
from rescue.consensus import Draws
from rescue.cost import Cost
from rescue.evaluation import evaluate
from rescue.records import CandidateRecord, SampleRecord
from rescue.settings import EvaluationSettings

ALL = Draws(pilot=10**6)  # enumerate every subset
SCORES = (0.2, 0.5, 0.5, 0.8, 0.9)  # repeated values: verifier ties
IOUS = (0.0, 0.25, 0.5, 0.75, 0.9)  # few values: consensus ties


def pool(seed: int, m: int, *, sid: str = "s") -> SampleRecord:
    """m candidates over fewer distinct masks (duplicates), with plan, execute and verify
    failures, tied verifier scores and a pairwise IoU drawn from few values."""
    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, max(2, m - 1)))
    pair = rng.choice(IOUS, size=(d, d))
    pair = np.triu(pair, 1) + np.triu(pair, 1).T + np.eye(d)
    verdict = {f"m{j}": (None if rng.random() < 0.15 else float(rng.choice(SCORES)))
               for j in range(d)}
    counts = {f"m{j}": (int(rng.integers(0, 50)), int(rng.integers(50, 100))) for j in range(d)}
    target = 100
    cands, first, order = [], {}, []
    for i in range(m):
        c = CandidateRecord(index=i, intersection=0, union=target, iou=0.0)
        c.cost["plan"] = Cost(prompt_tokens=400 if i == 0 else 0, calls=int(i == 0),
                              completion_tokens=20).to_json()
        u = rng.random()
        if u < 0.1:
            c.failed_stage = "plan"
        elif u < 0.2:
            c.failed_stage = "execute"
        else:
            mk = f"m{int(rng.integers(d))}"
            c.mask_key = mk
            c.intersection, c.union = counts[mk]
            c.iou = c.intersection / c.union
            if mk in first:
                c.duplicate_of = first[mk]
            else:
                first[mk] = i
                order.append(mk)
                c.cost["verify"] = Cost(prompt_tokens=300, calls=1,
                                        completion_tokens=int(rng.integers(5, 80))).to_json()
            c.verifier_score = verdict[mk]
            if verdict[mk] is None:
                c.failed_stage = "verify"
        cands.append(c)
    idx = [int(k[1:]) for k in order]
    return SampleRecord(sample_id=sid, dataset="d", query="q", height=1, width=1,
                        target_area=target, simulated=True, candidates=cands, masks=order,
                        mask_iou=pair[np.ix_(idx, idx)].tolist())


RULES = {
    "prefilter": lambda k, tau, p: policies.Prefilter(k),
    "early_exit": lambda k, tau, p: policies.EarlyExit(k, tau),
    "until_confident": lambda k, tau, p: policies.UntilConfident(p),
}
BRUTE = {
    "prefilter": lambda k, tau, p: lambda v, s: ref.prefilter(v, s, k),
    "early_exit": lambda k, tau, p: lambda v, s: ref.early_exit(v, s, k, tau),
    "until_confident": lambda k, tau, p: lambda v, s: ref.until_confident(v, s, p),
}


def _sample_policy(rule, rec: SampleRecord, draws: Draws = ALL) -> policies.SamplePolicy:
    got = policies.Policy(rule, selection.VERIFIER.score)(rec, 0, draws)
    assert got is not None
    return got


def _values(rec: SampleRecord) -> np.ndarray:
    cands = rec.candidates
    inter = np.array([c.intersection if c.ok else 0 for c in cands], float)
    union = np.array([c.union if c.ok else rec.target_area for c in cands], float)
    return np.stack([inter, union, inter / union])


def _cost(rec: SampleRecord, n: int, estimator: str, verified=None) -> dict[str, float]:
    return expected_cost.expected(expected_cost.PoolCost.of(rec), n, estimator,
                                  verified=verified)


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("seed", range(10))
def test_each_policy_equals_brute_force_over_every_subset(name, seed):
    rng = np.random.default_rng(100 + seed)
    m = int(rng.integers(2, 9))
    rec = pool(seed, m)
    view = ref.View(rec)
    for k in (1, 2, 3):
        for tau, p in ((0.5, 0.5), (0.8, 0.85)):
            sp = _sample_policy(RULES[name](k, tau, p), rec)
            brute = BRUTE[name](k, tau, p)
            for n in range(1, m + 1):
                for estimator, subsets in (("best_of_n", ref.every_subset(m, n)),
                                           ("prefix", [tuple(range(n))])):
                    want = ref.expectation(view, brute, subsets)
                    got = sp.estimate(n, estimator, _values(rec))
                    assert got.exact
                    where = (name, k, tau, p, n, estimator)
                    np.testing.assert_allclose(got.weights, want.weights, atol=1e-12,
                                               err_msg=str(where))
                    spent = _cost(rec, n, estimator, got.verified)
                    assert spent["verify_masks"] == pytest.approx(want.masks, abs=1e-9), where
                    assert spent["verify_tokens"] == pytest.approx(want.tokens, abs=1e-7), where


@pytest.mark.parametrize("seed", range(8))
def test_with_k_equal_to_n_the_prefilter_is_the_plain_verifier(seed):
    m = 3 + seed % 5
    rec = pool(seed, m)
    view = ref.View(rec)
    for n in range(1, m + 1):
        rule = policies.Prefilter(n)
        sp = _sample_policy(rule, rec)
        subsets = ref.every_subset(m, n)
        plain = ref.expectation(view, ref.plain_verifier, subsets)
        got = sp.estimate(n, "best_of_n", _values(rec))
        np.testing.assert_allclose(got.weights, plain.weights, atol=1e-12)
        assert _cost(rec, n, "best_of_n", got.verified) == pytest.approx(
            _cost(rec, n, "best_of_n"), nan_ok=True)
        # the rule itself, not only its shortcut to the plain verifier, verifies every mask
        w, sent = rule.outcomes(sp.pool, np.array(subsets))
        np.testing.assert_allclose(w.mean(axis=0), plain.weights, atol=1e-12)
        assert sent.sum(axis=1).mean() == pytest.approx(plain.masks)


def test_the_prefilter_with_k_at_the_largest_n_gives_the_verifiers_rows():
    recs = [pool(s, 7, sid=f"s{s}") for s in range(6)]
    params = policies.PolicyParams(prefilter_k=7)
    sels = (selection.VERIFIER, *selection.policy_selectors(params)[:1])
    table = evaluate(recs, EvaluationSettings(n_grid=(1, 2, 4, 7), selectors=sels,
                                              primary=sels[0], bootstrap=50), by_tag=False)
    cols = [c for c in table.columns if c not in ("selector", "cost_units")]
    a = table[table.selector == "verifier"][cols].reset_index(drop=True)
    b = table[table.selector == "prefilter"][cols].reset_index(drop=True)
    assert len(a) == 8
    assert a.equals(b)


def test_until_confident_in_closed_form_equals_every_subset_on_a_larger_pool():
    rec = pool(7, 13)
    view = ref.View(rec)
    rule = policies.UntilConfident(0.6)
    sp = _sample_policy(rule, rec, Draws(pilot=2))  # a closed form: it never draws
    for n in (2, 5, 9, 13):
        want = ref.expectation(view, lambda v, s: ref.until_confident(v, s, 0.6),
                               ref.every_subset(13, n))
        got = sp.estimate(n, "best_of_n", _values(rec))
        assert got.exact
        np.testing.assert_allclose(got.weights, want.weights, atol=1e-12)
        assert _cost(rec, n, "best_of_n", got.verified)["verify_masks"] == pytest.approx(
            want.masks)


@pytest.mark.parametrize("name", ["prefilter", "early_exit"])
def test_drawn_subsets_estimate_the_enumeration_within_their_error(name):
    recs = [pool(s, 12, sid=f"s{s}") for s in range(20, 26)]
    rule = RULES[name](2, 0.5, 0.5)
    n = 6  # C(12, 6) = 924 subsets, 256 drawn
    for rec in recs:
        exact = _sample_policy(rule, rec).estimate(n, "best_of_n", _values(rec))
        drawn = _sample_policy(rule, rec, Draws(pilot=256)).estimate(n, "best_of_n",
                                                                     _values(rec))
        assert exact.exact and not drawn.exact and drawn.draws == 256
        se = np.sqrt(np.diag(drawn.cov))
        mean = np.array([*(drawn.weights @ _values(rec).T), *_spend(rec, n, drawn)])
        want = np.array([*(exact.weights @ _values(rec).T), *_spend(rec, n, exact)])
        assert np.all(np.abs(mean - want) <= 4 * se + 1e-12), (mean, want, se)
        assert se[2] > 0


def _spend(rec: SampleRecord, n: int, est: policies.PolicyEstimate) -> tuple[float, float]:
    got = _cost(rec, n, "best_of_n", est.verified)
    return got["verify_masks"], got["verify_tokens"]


@pytest.mark.parametrize("draws", [ALL, Draws(pilot=16)])
def test_no_policy_costs_more_than_the_plain_verifier_at_any_n(draws):
    """Also where the policies draw subsets: their cost is the plain verifier's exact cost
    less the saving over the draws."""
    for seed in range(12):
        m = 4 + seed % 8
        rec = pool(seed, m)
        for rule in (policies.Prefilter(2), policies.EarlyExit(2, 0.5),
                     policies.EarlyExit(3, 0.25), policies.UntilConfident(0.5)):
            sp = _sample_policy(rule, rec, draws)
            for n in range(1, m + 1):
                for e in ("best_of_n", "prefix"):
                    plain = _cost(rec, n, e)
                    got = _cost(rec, n, e, sp.estimate(n, e, _values(rec)).verified)
                    for q in ("verify_masks", "verify_tokens", "total_tokens"):
                        assert got[q] <= plain[q] + 1e-9, (rule, n, e, q)


def test_policies_are_rows_of_metrics_with_quality_and_cost_at_every_n():
    recs = [pool(s, 10, sid=f"s{s}") for s in range(40, 52)]
    names = ["verifier", "prefilter", "early_exit", "until_confident"]
    settings = settings_of([1, 2, 5, 10], names, bootstrap=100, consensus_draws=64)
    table = evaluate(recs, settings, by_tag=False)
    at = table.set_index(["estimator", "selector", "n"])
    for e in ("best_of_n", "prefix"):
        for n in (1, 2, 5, 10):
            plain = at.loc[(e, "verifier", n)]
            for name in names[1:]:
                row = at.loc[(e, name, n)]
                assert 0 <= row.giou <= 1 and row.giou_lo <= row.giou <= row.giou_hi
                for q in ("verify_masks", "verify_tokens", "total_tokens"):
                    assert row[q] <= plain[q] + 1e-9
                    assert row[f"{q}_lo"] <= row[q] <= row[f"{q}_hi"]
                assert row.plan_tokens == plain.plan_tokens
                assert row.execute_prompts == plain.execute_prompts
    # C(10, 5) = 252 subsets > 64: drawn, with the error reported and the intervals widened
    mc = at.loc[("best_of_n", "prefilter", 5)]
    assert not mc.exact and mc.giou_mc_se > 0
    assert at.loc[("best_of_n", "until_confident", 5)].exact  # a closed form
    # at N = 1 every policy verifies the one mask drawn: the plain verifier
    for name in names[1:]:
        for col in ("giou", "ciou", "verify_masks", "verify_tokens"):
            assert at.loc[("best_of_n", name, 1)][col] == pytest.approx(
                at.loc[("best_of_n", "verifier", 1)][col])


def test_the_table_equals_brute_force_per_sample_means():
    recs = [pool(s, 6, sid=f"s{s}") for s in range(60, 66)]
    settings = settings_of([3], ["early_exit"], bootstrap=0)
    row = evaluate(recs, settings, by_tag=False).set_index("estimator").loc["best_of_n"]
    giou, masks, tokens = [], [], []
    for rec in recs:
        want = ref.expectation(ref.View(rec), lambda v, s: ref.early_exit(v, s, 3, 0.8),
                               ref.every_subset(6, 3))
        giou.append(want.weights @ _values(rec)[2])
        masks.append(want.masks)
        tokens.append(want.tokens)
    assert row.giou == pytest.approx(np.mean(giou))
    assert row.verify_masks == pytest.approx(np.mean(masks))
    assert row.verify_tokens == pytest.approx(np.mean(tokens))


def test_the_single_answer_is_the_policy_over_the_whole_pool():
    rec = pool(3, 9)
    view = ref.View(rec)
    for sel in selection.policy_selectors(policies.PolicyParams(2, 2, 0.5, 0.5)):
        brute = {"prefilter": lambda s: ref.prefilter(view, s, 2),
                 "early_exit": lambda s: ref.early_exit(view, s, 2, 0.5),
                 "until_confident": lambda s: ref.until_confident(view, s, 0.5)}[sel.name]
        pick = brute(list(range(9))).pick
        assert sel.answer(rec) == rec.candidates[min(pick)].index, sel.name
    failed = SampleRecord(sample_id="f", dataset="d", query="q", height=1, width=1,
                          target_area=1, simulated=True,
                          candidates=[CandidateRecord(index=0, failed_stage="plan")])
    assert all(sel.answer(failed) is None for sel in selection.POLICIES)


def test_policies_are_opt_in_and_configured_under_selection_policy():
    assert not {s.name for s in selection.DEFAULTS} & {s.name for s in selection.POLICIES}
    cfg = {"max_n": 8, "selection": {
        "selectors": ["verifier", "prefilter", "early_exit", "until_confident"],
        "primary": "until_confident",
        "policy": {"prefilter_k": 3, "early_exit_k": 2, "early_exit_iou": 0.7,
                   "confident_score": 0.95}}}
    s = EvaluationSettings.from_config(cfg)
    rules = [sel.policy.rule for sel in s.selectors[1:]]
    assert rules == [policies.Prefilter(3), policies.EarlyExit(2, 0.7),
                     policies.UntilConfident(0.95)]
    assert s.primary is s.selectors[3]
    with pytest.raises(ValueError, match=r"unknown selection.policy keys \['k'\]"):
        policies.PolicyParams.from_config({"k": 2})
    with pytest.raises(ValueError, match="prefilter_k must be >= 1"):
        policies.PolicyParams(prefilter_k=0)
    with pytest.raises(ValueError, match=r"early_exit_iou must be in \[0, 1\]"):
        policies.PolicyParams(early_exit_iou=1.5)


def test_a_record_without_pairwise_ious_is_scored_as_the_plain_verifier():
    rec = pool(5, 6)
    rec.masks, rec.mask_iou = [], []
    assert policies.Policy(policies.Prefilter(1), selection.VERIFIER.score)(rec, 0, ALL) is None
    assert policies.Policy(policies.UntilConfident(0.5), selection.VERIFIER.score)(
        rec, 0, ALL) is not None
    table = evaluate([rec], settings_of([3], ["verifier", "prefilter"], bootstrap=0),
                     by_tag=False)
    a, b = (table[table.selector == s].iloc[0] for s in ("verifier", "prefilter"))
    assert a.giou == b.giou and a.verify_masks == b.verify_masks
    assert not math.isnan(b.verify_masks)
