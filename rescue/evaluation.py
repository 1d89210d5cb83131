"""Multi-N evaluation of cached records: gIoU and cIoU for every (estimator, selector, N).

Everything is computed from the per-candidate intersection and union counts in the records, so no
model is called. The work is vectorised: per sample, the expected I, U and IoU of the selected
candidate are computed once for every (estimator, selector, N); the bootstrap then resamples sample
indices and reduces all of them in one matrix product.

Accounting, stated once here and in the outputs:
- A candidate without a mask (failed at plan or execute) counts as an empty prediction: I = 0,
  U = target area. One whose verification failed keeps its mask and its I and U.
- A sample whose whole record failed (`error` set, or no candidates) is not dropped: it scores
  IoU 0 with I = 0 and U = target area, and is counted in `num_failed_samples`.
- N larger than every pool is skipped with a warning. A sample whose pool is smaller than N (but
  not all) is evaluated with its whole pool (N clamped to its M) and counted in `num_short_pools`.
- cIoU@N = E[ΣI] / E[ΣU]: the selection weights are applied to I and U separately, each summed
  over samples, then divided (`CIOU_DEFINITION`, also in the table's `attrs`).
- Exactness: every value is an exact expectation except a selector scored within subsets
  (consensus) where a sample has more N-subsets than it enumerates. Such a row has
  `exact` False and the Monte-Carlo standard errors `giou_mc_se` and `ciou_mc_se` (cIoU's by the
  delta method); its bootstrap interval is widened by them (half-widths added in quadrature with
  z × SE), so the interval covers both the sampling of samples and of subsets.
- A verification policy (`rescue.policies`: prefilter, early_exit) is Monte-Carlo in the same
  way where it draws subsets; its verify cost then is too (from the same draws), and the
  intervals of verify_masks, verify_calls, verify_tokens, total_tokens and gpu_s are widened by
  that error in the same way (the quality SE columns are the only SE columns). So is the
  listwise verifier's cost, from the subsets it draws; the arena's is exact.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from statistics import NormalDist

import numpy as np
import pandas as pd

from rescue import aggregation, expected_cost, policies
from rescue.consensus import SubsetEstimate
from rescue.estimators import Ranking, prefix_select_weights
from rescue.expected_cost import QUANTITIES
from rescue.records import SampleRecord, reason_code
from rescue.selection import Selector, SubsetBatch, SubsetWeights
from rescue.settings import EvaluationSettings
from rescue.truth import SampleTruth

log = logging.getLogger(__name__)

CIOU_DEFINITION = (
    "cIoU@N = E[sum I] / E[sum U]: selection weights applied to intersection and union "
    "separately, each summed over samples, then divided"
)
COLUMNS = [
    "subset", "estimator", "selector", "n", "giou", "ciou", "giou_lo", "giou_hi", "ciou_lo",
    "ciou_hi", "exact", "giou_mc_se", "ciou_mc_se", "num_samples", "num_failed_samples",
    "num_short_pools", "ciou_definition",
]
COST_UNITS = (
    "cost columns: expected per sample at N, as cached with each answer; tokens = prompt + "
    "completion (reasoning included) from the servers' usage, the planner's prompt once (one "
    "request with n = N); prompts, encodes and masks = distinct calls after dedupe, verify_calls "
    "= the verifier's requests (per mask, per ordered pair, or per listwise set); gpu_s from "
    "the cost.* rates (NaN: none set); NaN where not recorded or not modelled"
)
COST_COLUMNS = [f"{q}{end}" for q in QUANTITIES for end in ("", "_lo", "_hi")] + ["cost_units"]
"""Beside every row's quality: each `expected_cost.QUANTITIES` with its bootstrap interval."""


@dataclass
class _Pools:
    """The working samples whose pool has `m` candidates, as (b, m) arrays."""

    rows: np.ndarray
    inter: np.ndarray
    union: np.ndarray
    iou: np.ndarray
    scores: dict[str, np.ndarray]

    @cached_property
    def values(self) -> np.ndarray:
        """(b, 3, m): I, U and IoU of each candidate, the values a subset estimate is of."""
        return np.stack([self.inter, self.union, self.iou], axis=1)


@dataclass
class _PerSample:
    """Expected I, U and IoU of the selected candidate per sample, for each (estimator, sel, N)."""

    keys: list[tuple[str, str, int]]
    inter: np.ndarray  # (K, S)
    union: np.ndarray
    iou: np.ndarray
    short: np.ndarray  # (K, S) bool: the sample's pool is smaller than N
    failed: np.ndarray  # (S,) bool
    pool_size: np.ndarray  # (S,) int
    mc: np.ndarray  # (K, S) bool: a Monte-Carlo estimate
    mc_cov: np.ndarray  # (K, S, 3, 3): its covariance of the expected (I, U, IoU); 0 if exact
    # (row of keys, sample) -> a verification policy's estimate: what it verifies, its error
    spent: dict[tuple[int, int], policies.PolicyEstimate] = field(default_factory=dict)


def _check_records(records: Sequence[SampleRecord]) -> None:
    if not records:
        raise ValueError("no records to evaluate")
    dup = [k for k, v in Counter(r.sample_id for r in records).items() if v > 1]
    if dup:
        raise ValueError(f"{len(dup)} sample ids occur more than once, e.g. {dup[:3]}")


def _sample_failed(r: SampleRecord) -> bool:
    return r.error is not None or not r.candidates


def _pools(records: Sequence[SampleRecord], selectors: Sequence[Selector],
           seed: int) -> list[_Pools]:
    by_m: dict[int, list[int]] = {}
    for row, r in enumerate(records):
        if not _sample_failed(r):
            by_m.setdefault(len(r.candidates), []).append(row)
    out = []
    for m, rows in sorted(by_m.items()):
        inter = np.zeros((len(rows), m))
        union = np.zeros((len(rows), m))
        scores = {s.name: np.empty((len(rows), m)) for s in selectors}
        for b, row in enumerate(rows):
            r = records[row]
            for k, c in enumerate(r.candidates):
                if c.ok:
                    inter[b, k], union[b, k] = c.intersection, c.union
                else:
                    union[b, k] = r.target_area  # an empty prediction
            for s in selectors:
                scores[s.name][b] = s.scores(r.candidates, key=r.sample_id, seed=seed)
        iou = np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
        out.append(_Pools(np.asarray(rows), inter, union, iou, scores))
    return out


def _aggregate(records: Sequence[SampleRecord], n_grid: Sequence[int],
               settings: EvaluationSettings, truths: Mapping[str, SampleTruth] | None,
               ps: _PerSample, pos: Mapping[tuple[str, str, int], int]) -> None:
    """Fill the aggregators' rows of `ps` (`rescue.aggregation`) from the stored masks."""
    if not settings.aggregators:
        return
    if truths is None:
        raise ValueError("aggregators need the run's truth and masks (masks.jsonl)")
    for row, r in enumerate(records):
        if _sample_failed(r):
            continue
        if r.sample_id not in truths:
            raise ValueError(f"masks.jsonl has no entry for sample {r.sample_id!r}")
        pool = aggregation.Pool.of(r, truths[r.sample_id])
        m = len(r.candidates)
        for a in settings.aggregators:
            for e in settings.estimators:
                for n in n_grid:
                    est = aggregation.estimate(a, pool, n, estimator=e, seed=settings.seed,
                                               sample_id=r.sample_id)
                    k = pos[(e, a.name, n)]
                    ps.inter[k, row], ps.union[k, row], ps.iou[k, row] = est.values
                    ps.short[k, row] = n > m
                    ps.mc[k, row] = not est.exact
                    ps.mc_cov[k, row] = est.cov


def _per_sample(records: Sequence[SampleRecord], n_grid: Sequence[int],
                settings: EvaluationSettings,
                truths: Mapping[str, SampleTruth] | None = None) -> _PerSample:
    selectors, estimators, seed = settings.selectors, settings.estimators, settings.seed
    s_count = len(records)
    failed = np.array([_sample_failed(r) for r in records])
    pool_size = np.array([0 if _sample_failed(r) else len(r.candidates) for r in records])
    target = np.array([float(r.target_area) for r in records])
    keys = [(e, s.name, n) for e in estimators for s in selectors for n in n_grid]
    keys += [(e, a.name, n) for e in estimators for a in settings.aggregators for n in n_grid]
    pos = {k: i for i, k in enumerate(keys)}
    inter = np.zeros((len(keys), s_count))
    union = np.tile(target, (len(keys), 1))  # failed samples keep I = 0, U = target area
    iou = np.zeros((len(keys), s_count))
    short = np.zeros((len(keys), s_count), dtype=bool)
    mc = np.zeros((len(keys), s_count), dtype=bool)
    mc_cov = np.zeros((len(keys), s_count, 3, 3))
    draws = settings.draws(s_count)
    spent: dict[tuple[int, int], policies.PolicyEstimate] = {}
    for pools in _pools(records, selectors, seed):
        m = pools.inter.shape[1]
        for s in selectors:
            scores = pools.scores[s.name]
            ranking = Ranking.of(scores) if "best_of_n" in estimators else None
            # a selector scored within each subset drawn: its per-sample weights, or None where
            # a record lacks what that needs (that sample keeps the pool-level weights)
            within = ([s.within(records[row], seed, draws)
                       for row in pools.rows] if s.within is not None else [])
            batches = _batches(within)
            # a verification policy: its pick and what it verifies, per sample (None: the
            # record lacks what it reads; scored as the plain verifier)
            policy = ([s.policy(records[row], seed, draws)
                       for row in pools.rows] if s.policy is not None else [])
            for n in n_grid:
                nn = min(n, m)
                for e in estimators:
                    best = e == "best_of_n"
                    w = ranking.best_of_n(nn) if best else prefix_select_weights(scores, nn)
                    k = pos[(e, s.name, n)]
                    for at, batch in batches:
                        if not best:
                            w[at] = batch.prefix(nn)
                            continue
                        got = batch.estimate(nn, pools.values[at])
                        w[at] = np.stack([est.weights for est in got])
                        mc[k, pools.rows[at]] = [not est.exact for est in got]
                        mc_cov[k, pools.rows[at]] = np.stack([est.cov for est in got])
                    for b, pol in enumerate(policy):
                        if pol is None:
                            continue
                        got = pol.estimate(nn, e, np.stack(
                            [pools.inter[b], pools.union[b], pools.iou[b]]))
                        w[b] = got.weights
                        mc[k, pools.rows[b]] = not got.exact
                        mc_cov[k, pools.rows[b]] = got.cov[:3, :3]
                        spent[(k, int(pools.rows[b]))] = got
                    inter[k, pools.rows] = np.einsum("bm,bm->b", w, pools.inter)
                    union[k, pools.rows] = np.einsum("bm,bm->b", w, pools.union)
                    iou[k, pools.rows] = np.einsum("bm,bm->b", w, pools.iou)
                    short[k, pools.rows] = n > m
    ps = _PerSample(keys, inter, union, iou, short, failed, pool_size, mc, mc_cov, spent)
    _aggregate(records, n_grid, settings, truths, ps, pos)
    return ps


class _OneByOne:
    """`SubsetBatch` for a class that offers none: each item on its own."""

    def __init__(self, items: Sequence[SubsetWeights]) -> None:
        self.items = items

    def prefix(self, n: int) -> np.ndarray:
        return np.stack([item.prefix(n) for item in self.items])

    def estimate(self, n: int, values: Sequence[np.ndarray]) -> list[SubsetEstimate]:
        return [item.estimate(n, v) for item, v in zip(self.items, values, strict=True)]


def _batches(within: Sequence[SubsetWeights | None]) -> list[tuple[np.ndarray, SubsetBatch]]:
    """(positions in the group, their `SubsetBatch`) per class of the samples with subset
    weights (the class's `batch` where it offers one); the others keep the pool-level weights."""
    out = []
    for kind in dict.fromkeys(type(sub) for sub in within if sub is not None):
        at = np.array([b for b, sub in enumerate(within) if type(sub) is kind])
        items = [within[b] for b in at]
        make = getattr(kind, "batch", None)
        out.append((at, make(items) if make is not None else _OneByOne(items)))
    return out


def _costs(records: Sequence[SampleRecord], n_grid: Sequence[int],
           settings: EvaluationSettings, keys: Sequence[tuple[str, str, int]],
           spent: Mapping[tuple[int, int], policies.PolicyEstimate] | None = None,
           ) -> tuple[np.ndarray, np.ndarray]:
    """(K, S, Q) expected cost per row and sample (`rescue.expected_cost`): the same for every
    selector but for how it spends the verifier; a policy's verify stage from what it verifies
    (`spent`). And (K, S, Q) the Monte-Carlo variance of each (0 where exact)."""
    # aggregators read pointwise verifier scores where they need the verifier at all
    calls = {d.name: getattr(d, "verifier_calls", "per_mask") if d.needs_verifier else "none"
             for d in (*settings.selectors, *settings.aggregators)}
    modes = [calls[s] for _, s, _ in keys]
    table = expected_cost.sample_costs(records, n_grid, settings.estimators, settings.cost,
                                       modes, seed=settings.seed,
                                       draws=settings.draws(len(records)))
    out = np.empty((len(keys), len(records), len(QUANTITIES)))
    var = np.zeros_like(out)
    for k, ((e, _, n), mode) in enumerate(zip(keys, modes, strict=True)):
        out[k], var[k] = table[(mode, e, n)]
    pools: dict[int, expected_cost.PoolCost] = {}
    rates = settings.cost
    v = rates.verifier
    # gpu_s is linear in the verified masks and tokens: its variance from their covariance
    gpu = np.array([v.gpu_s_per_call or 0.0, v.gpu_s_per_token or 0.0])
    col = {q: QUANTITIES.index(q) for q in QUANTITIES}
    for (k, row), est in (spent or {}).items():
        e, _, n = keys[k]
        pool = pools.setdefault(row, expected_cost.PoolCost.of(records[row]))
        got = expected_cost.expected(pool, n, e, verified=est.verified, rates=rates)
        out[k, row] = [got[q] for q in QUANTITIES]
        if not est.exact:
            cov = est.cov[3:, 3:]  # (verified masks, verify tokens)
            var[k, row, col["verify_masks"]] = var[k, row, col["verify_calls"]] = cov[0, 0]
            var[k, row, col["verify_tokens"]] = var[k, row, col["total_tokens"]] = cov[1, 1]
            var[k, row, col["gpu_s"]] = gpu @ cov @ gpu
    return out, var


def _mc_se(ps: _PerSample, idx: np.ndarray, ciou: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo standard errors (K,) of gIoU and cIoU over the samples `idx`: the samples'
    draws are independent, so variances add; cIoU = ΣI/ΣU by the delta method,
    Var ≈ Σ Var(I − c·U) / (ΣU)²."""
    cov = ps.mc_cov[:, idx]
    giou_se = np.sqrt(cov[..., 2, 2].sum(axis=1)) / max(len(idx), 1)
    c = ciou[:, None]
    v = cov[..., 0, 0] - 2 * c * cov[..., 0, 1] + c * c * cov[..., 1, 1]
    u = ps.union[:, idx].sum(axis=1)
    ciou_se = np.divide(np.sqrt(np.clip(v.sum(axis=1), 0, None)), u, out=np.zeros_like(u),
                        where=u > 0)
    return giou_se, ciou_se


def _widen(est: np.ndarray, lo: np.ndarray, hi: np.ndarray, se: np.ndarray,
           z: float) -> tuple[np.ndarray, np.ndarray]:
    """A bootstrap interval widened by a Monte-Carlo error: each half-width in quadrature with
    z × SE (unchanged where SE is 0)."""
    return (est - np.hypot(est - lo, z * se), est + np.hypot(hi - est, z * se))


def _resample_counts(rng: np.random.Generator, size: int, draws: int) -> np.ndarray:
    """(draws, size): how often each sample appears in each bootstrap resample."""
    idx = rng.integers(0, size, size=(draws, size)) + size * np.arange(draws)[:, None]
    return np.bincount(idx.ravel(), minlength=draws * size).reshape(draws, size).astype(float)


def _ratio(i: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.divide(i, u, out=np.ones_like(i), where=u > 0)


def _usable_n(n_grid: Sequence[int], records: Sequence[SampleRecord]) -> list[int]:
    grid = list(n_grid)
    max_m = max((len(r.candidates) for r in records if not _sample_failed(r)), default=0)
    if max_m == 0:  # every sample failed: report zeros at every N rather than an empty table
        log.warning("every one of %d samples failed; all metrics are 0", len(records))
        return grid
    skipped = [n for n in grid if n > max_m]
    if skipped:
        log.warning("skipping N=%s: larger than every pool (largest M=%d)", skipped, max_m)
    return [n for n in grid if n <= max_m]


def subsets(records: Sequence[SampleRecord], by_tag: bool = True) -> dict[str, np.ndarray]:
    """Sample positions per reported subset: "all", then one per tag (e.g. ReasonSeg long/short)."""
    out = {"all": np.arange(len(records))}
    if by_tag:
        for tag in sorted({t for r in records for t in r.tags}):
            out[tag] = np.array([i for i, r in enumerate(records) if tag in r.tags])
    return out


def evaluate(records: Sequence[SampleRecord], settings: EvaluationSettings,
             by_tag: bool = True,
             truths: Mapping[str, SampleTruth] | None = None) -> pd.DataFrame:
    """One row per (subset, estimator, selector, N) with gIoU, cIoU and bootstrap intervals.

    Failed samples count as IoU 0 (I = 0, U = target area), never dropped; see the module doc for
    the rest of the accounting. cIoU@N = E[ΣI] / E[ΣU]. Intervals are percentile bootstraps over
    samples (`settings.bootstrap` resamples, the same resamples for every row so rows compare
    paired); NaN when it is 0. `settings.seed` fixes the resamples and any selector's subset
    draws. A selector with `within` (consensus) is scored within each N-subset. Aggregators
    (`settings.aggregators`) read `truths` (the run's masks.jsonl, `rescue.truth.load`).
    """
    _check_records(records)
    # the resamples index samples: fix their order so a run, a merge and a re-evaluation agree
    records = sorted(records, key=lambda r: r.sample_id)
    grid = _usable_n(settings.n_grid, records)
    ps = _per_sample(records, grid, settings, truths)
    rng = np.random.default_rng(settings.seed)
    ci, bootstrap = settings.ci, settings.bootstrap
    q = [(1 - ci) / 2, 1 - (1 - ci) / 2]
    z = NormalDist().inv_cdf(q[1])
    cost, cost_var = _costs(records, grid, settings, ps.keys, ps.spent)
    rows, cost_rows = [], []
    for name, idx in subsets(records, by_tag).items():
        size = len(idx)
        inter, union, iou = ps.inter[:, idx], ps.union[:, idx], ps.iou[:, idx]
        giou = iou.mean(axis=1)
        ciou = _ratio(inter.sum(axis=1), union.sum(axis=1))
        spent = cost[:, idx]  # (K, size, Q)
        spent_mean = spent.mean(axis=1)
        if bootstrap > 0:
            counts = _resample_counts(rng, size, bootstrap)
            g_lo, g_hi = np.quantile(counts @ iou.T / size, q, axis=0)
            c_lo, c_hi = np.quantile(_ratio(counts @ inter.T, counts @ union.T), q, axis=0)
            # the same resamples as the quality columns: cost and quality compare paired
            # one matrix product (BLAS); einsum's loop took ~4x the rest of the bootstrap
            k, q_count = spent.shape[0], spent.shape[2]
            resampled = counts @ spent.transpose(1, 0, 2).reshape(size, k * q_count)
            s_lo, s_hi = np.quantile(resampled.reshape(bootstrap, k, q_count) / size, q, axis=0)
        else:
            g_lo = g_hi = c_lo = c_hi = np.full(len(ps.keys), np.nan)
            s_lo = s_hi = np.full(spent_mean.shape, np.nan)
        # a policy's Monte-Carlo verify cost: its intervals widened as the quality ones are
        s_se = np.sqrt(cost_var[:, idx].sum(axis=1)) / max(size, 1)
        s_lo, s_hi = (np.where(s_se > 0, wide, edge) for wide, edge in
                      zip(_widen(spent_mean, s_lo, s_hi, s_se, z), (s_lo, s_hi), strict=True))
        exact = ~ps.mc[:, idx].any(axis=1)
        g_se, c_se = _mc_se(ps, idx, ciou)
        g_lo, g_hi = _widen(giou, g_lo, g_hi, g_se, z)
        c_lo, c_hi = _widen(ciou, c_lo, c_hi, c_se, z)
        n_failed = int(ps.failed[idx].sum())
        n_short = ps.short[:, idx].sum(axis=1)
        for k, (e, s, n) in enumerate(ps.keys):
            rows.append((name, e, s, n, giou[k], ciou[k], g_lo[k], g_hi[k], c_lo[k], c_hi[k],
                         bool(exact[k]), g_se[k], c_se[k], size, n_failed, int(n_short[k]),
                         CIOU_DEFINITION))
            cost_rows.append([v for t in zip(spent_mean[k], s_lo[k], s_hi[k], strict=True)
                              for v in t] + [COST_UNITS])
    df = pd.DataFrame(rows, columns=COLUMNS)
    df = pd.concat([df, pd.DataFrame(cost_rows, columns=COST_COLUMNS)], axis=1)
    df.attrs.update(
        ciou_definition=CIOU_DEFINITION,
        cost_units=COST_UNITS,
        cost_rates=settings.cost.to_json(),
        bootstrap=bootstrap,
        ci=ci,
        primary=settings.primary.name,
        seed=settings.seed,
        simulated=any(r.simulated for r in records),
    )
    return df


def curve(metrics: pd.DataFrame, selector: str, estimator: str = "best_of_n") -> pd.DataFrame:
    """One selector's rows over all samples (subset "all"), by increasing N."""
    m = metrics[(metrics.selector == selector) & (metrics.estimator == estimator)]
    if "subset" in m:
        m = m[m.subset == "all"]
    return m.sort_values("n")


def headline(metrics: pd.DataFrame, settings: EvaluationSettings) -> float | None:
    """The number a study is about (and a sweeper optimises): the primary selector's best-of-N
    gIoU at the largest N, over all samples; None when the table has no such row."""
    head = curve(metrics, settings.primary.name)
    return float(head.giou.iloc[-1]) if len(head) else None


def per_sample_table(records: Sequence[SampleRecord], settings: EvaluationSettings, n: int,
                     selector: Selector | None = None,
                     estimator: str = "best_of_n") -> pd.DataFrame:
    """Expected I, U and IoU of the pick of `selector` (default: the primary) for every sample,
    for slicing.

    Columns: sample_id, dataset, tags, failed, pool_size, target_area, expected_intersection,
    expected_union, expected_iou. Same accounting as `evaluate` (N clamped to short pools).
    """
    _check_records(records)
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}")
    selector = settings.primary if selector is None else selector
    one = dataclasses.replace(settings, n_grid=(n,), selectors=(selector,), primary=selector,
                              estimators=(estimator,), max_n=None, aggregators=())
    ps = _per_sample(records, [n], one)
    return pd.DataFrame({
        "sample_id": [r.sample_id for r in records],
        "dataset": [r.dataset for r in records],
        "tags": [list(r.tags) for r in records],
        "failed": ps.failed,
        "pool_size": ps.pool_size,
        "target_area": [r.target_area for r in records],
        "expected_intersection": ps.inter[0],
        "expected_union": ps.union[0],
        "expected_iou": ps.iou[0],
    })


def failure_summary(records: Sequence[SampleRecord]) -> dict:
    """Failed samples and candidates, counted by stage and by reason code (`records.reason_code`).

    `failed_candidates` counts every candidate with a `failed_stage`, including failed
    verifications, whose masks still count; `candidates_without_mask` only plan/execute failures.
    """
    by_stage: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    sample_errors: Counter[str] = Counter()
    candidates = 0
    for r in records:
        if r.error is not None:
            sample_errors[reason_code(r.error)] += 1
        for c in r.candidates:
            candidates += 1
            if c.failed_stage is not None:
                by_stage[c.failed_stage] += 1
                by_reason[f"{c.failed_stage}: {reason_code(c.error)}"] += 1
    return {
        "samples": len(records),
        "failed_samples": sum(_sample_failed(r) for r in records),
        "sample_errors": dict(sample_errors.most_common()),
        "candidates": candidates,
        "failed_candidates": sum(by_stage.values()),
        "candidates_without_mask": sum(not c.ok for r in records for c in r.candidates),
        "by_stage": dict(by_stage.most_common()),
        "by_reason": dict(by_reason.most_common()),
    }


def _stage_counts(records: Sequence[SampleRecord]) -> dict[str, tuple[int, int, int]]:
    """stage -> (candidates that reached it, failed there, failed there by truncation)."""
    reached = Counter[str]()
    failed = Counter[str]()
    cut = Counter[str]()
    for r in records:
        for c in r.candidates:
            for stage in STAGES:
                reached[stage] += 1
                if c.failed_stage == stage:
                    failed[stage] += 1
                    if reason_code(c.error) in TRUNCATED:
                        cut[stage] += 1
                    break
    return {s: (reached[s], failed[s], cut[s]) for s in STAGES if reached[s]}


STAGES = ("plan", "execute", "verify")
TRUNCATED = frozenset({"parse:truncated", "verify:truncated"})
"""Reason codes of a reply cut off at max_tokens."""


def failure_shares(records: Sequence[SampleRecord]) -> dict[str, float]:
    """Share of the candidates that reached each stage and failed there."""
    return {s: f / n for s, (n, f, _) in _stage_counts(records).items()}


def truncation_shares(records: Sequence[SampleRecord]) -> dict[str, float]:
    """Share of the candidates that reached each model stage whose reply was cut off at
    max_tokens (`parse:truncated`, `verify:truncated`)."""
    return {s: t / n for s, (n, _, t) in _stage_counts(records).items() if s != "execute"}
