"""The exact expected cost of best-of-N from one cached pool, and of the first N (prefix).

Dedupe makes cost non-linear in N: identical prompts are executed once and identical masks verified
once, so what N hypotheses cost is the number of distinct groups they touch. For a uniformly random
N-subset of the M cached hypotheses, a group of g members is represented with probability

    P(g) = 1 - C(M-g, N) / C(M, N) = 1 - prod_{k<g} (M-N-k) / (M-k)

(no member drawn: all N from the M-g others), so the expected cost is sum over groups of P(g) x
the group's cost: exact, no sampling. The prefix estimator (hypotheses 0..N-1) represents a group
iff its first member is below N. Per-hypothesis costs (a planner child's completion tokens) are
linear: N/M of their sum, or the first N of them.

The verifier's calls depend on how a selector uses it (`VERIFIER_CALLS`):
- per mask (pointwise): one call per distinct mask drawn, the verify groups above;
- pairwise (the arena, `rescue.arena`): one call per ordered pair of distinct masks drawn that
  the run asked (near-duplicates are never sent), so a pair is called iff both its mask groups
  are represented: P = 1 - q(g_a) - q(g_b) + q(g_a + g_b), with q(g) = C(M-g, N) / C(M, N)
  (inclusion-exclusion; exact). A mask is shown iff it and one of its partners are drawn;
- listwise (`rescue.listwise`): one call per subset drawn whose top-k show two or more masks,
  the cost of that set's call. The mean over the subsets the evaluation draws (all of them
  where it enumerates: exact; else its seeded draws, with their Monte-Carlo variance).

`PoolCost.of(record)` reads a record's per-candidate costs (`CandidateRecord.cost`, carried by the
first member of each group), `expected(pool, n, estimator)` gives every `QUANTITIES` at N.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np

from rescue.consensus import Draws
from rescue.cost import Cost, CostRates
from rescue.listwise import ListwiseWeights
from rescue.records import SampleRecord

QUANTITIES = ("plan_tokens", "execute_prompts", "execute_encodes", "verify_masks",
              "verify_calls", "verify_tokens", "total_tokens", "gpu_s")
"""Cost columns of every (selector, N) row: expected per sample. Tokens are prompt + completion
(reasoning included) as the servers' `usage` counts them; the planner's prompt once per sample
(one request with n = N); `verify_masks` the distinct masks the verifier is shown,
`verify_calls` its requests (equal for a pointwise verifier; pairs for the arena, sets for
listwise); `gpu_s` is the user's conversion (`cost.*`), NaN where none is set."""


@lru_cache(maxsize=4096)
def miss_probabilities(m: int, n: int) -> np.ndarray:
    """q[g] = C(M-g, N) / C(M, N), g = 0..M: P(a uniform N-subset of M misses g given items).

    A running product of factors in [0, 1] (no factorials, nothing overflows). Read-only and
    kept per (M, N): every sample of a study asks for the same few."""
    if not 1 <= n <= m:
        raise ValueError(f"need 1 <= N <= M, got N={n}, M={m}")
    k = np.arange(m, dtype=float)
    factors = np.maximum(m - n - k, 0.0) / (m - k)
    q = np.concatenate([[1.0], np.cumprod(factors)])
    q.flags.writeable = False
    return q


def represented(m: int, n: int, sizes: Sequence[int] | np.ndarray, firsts: Sequence[int] |
                np.ndarray, estimator: str) -> np.ndarray:
    """P(each group is represented among the N drawn): best_of_n over uniform N-subsets of M,
    or prefix (the first N hypotheses: the group's first member is below N)."""
    sizes = np.asarray(sizes, dtype=int)
    if estimator == "prefix":
        return (np.asarray(firsts, dtype=int) < n).astype(float)
    if estimator != "best_of_n":
        raise ValueError(f"unknown estimator {estimator!r}")
    return 1.0 - miss_probabilities(m, n)[sizes]


@dataclass(frozen=True)
class Groups:
    """Groups of candidates sharing one call: their sizes, first members (pool positions), the
    cost of their call and each group's members (pool positions, increasing)."""

    sizes: np.ndarray
    firsts: np.ndarray
    costs: tuple[Cost, ...]
    members: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def of(cls, members: dict[str, list[int]], costs: dict[str, Cost]) -> Groups:
        keys = list(members)
        return cls(np.array([len(members[k]) for k in keys], dtype=int),
                   np.array([min(members[k]) for k in keys], dtype=int),
                   tuple(costs[k] if k in costs else Cost() for k in keys),
                   tuple(tuple(sorted(members[k])) for k in keys))

    def of_candidates(self, m: int) -> np.ndarray:
        """(M,) the group of each pool position (-1: in none)."""
        out = np.full(m, -1, dtype=int)
        for g, pos in enumerate(self.members):
            out[list(pos)] = g
        return out

    def expected(self, m: int, n: int, estimator: str) -> tuple[float, Cost]:
        """(expected number of groups represented, the `Cost` fields' expected sums)."""
        if not len(self.sizes):
            return 0.0, Cost()
        return self.weighted(represented(m, n, self.sizes, self.firsts, estimator))

    def weighted(self, p: np.ndarray) -> tuple[float, Cost]:
        """(expected groups, expected `Cost`) when group g is called with probability p[g]."""
        if not len(self.sizes):
            return 0.0, Cost()
        return float(np.sum(p)), _of_sums(p @ self.matrix)

    @cached_property
    def matrix(self) -> np.ndarray:
        """(G, len(_SUMMED)) the groups' costs as numbers: an expectation is one product."""
        return _matrix(self.costs)


_SUMMED = ("prompt_tokens", "completion_tokens", "reasoning_tokens", "calls", "prompts",
           "encodes", "latency_s", "server_s")
"""The numeric `Cost` fields an expectation sums."""


def _matrix(costs: Sequence[Cost]) -> np.ndarray:
    return np.array([[getattr(c, f) for f in _SUMMED] for c in costs],
                    dtype=float).reshape(len(costs), len(_SUMMED))


def _of_sums(sums: np.ndarray) -> Cost:
    """A Cost of floats (an expectation) from its `_SUMMED` fields."""
    return Cost(**{f: float(v) for f, v in zip(_SUMMED, sums, strict=True)})


def _weighted(costs: Sequence[Cost], w: np.ndarray) -> Cost:
    """sum_i w_i × cost_i for the numeric fields (a Cost of floats: an expectation)."""
    return _of_sums(np.asarray(w, dtype=float) @ _matrix(costs))


@dataclass(frozen=True)
class VerifySpend:
    """What a selector's verifier calls at N cost one sample, in expectation: distinct masks
    shown, calls, their `Cost`, and the Monte-Carlo covariance of (masks, calls, tokens) where
    it comes from drawn subsets (zeros where exact)."""

    masks: float
    calls: float
    cost: Cost
    cov: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))

    @property
    def exact(self) -> bool:
        return not self.cov.any()


def mask_groups(record: SampleRecord) -> tuple[np.ndarray, np.ndarray]:
    """(D,) sizes and first members of the record's distinct masks (`record.masks`): the
    working candidates carrying each (first = M where none does)."""
    m, d = len(record.candidates), len(record.masks)
    where = {k: i for i, k in enumerate(record.masks)}
    sizes, firsts = np.zeros(d, dtype=int), np.full(d, m, dtype=int)
    for pos, c in enumerate(record.candidates):
        i = where.get(c.mask_key) if c.ok and c.mask_key is not None else None
        if i is not None:
            sizes[i] += 1
            firsts[i] = min(firsts[i], pos)
    return sizes, firsts


@dataclass(frozen=True)
class PairCalls:
    """A pairwise run's verifier calls (`SampleRecord.comparisons`): each ordered pair of
    distinct masks asked, and what its call cost."""

    m: int
    sizes: np.ndarray  # (D,) working candidates with each distinct mask
    firsts: np.ndarray  # (D,) the first of them (M: none)
    pairs: np.ndarray  # (P, 2) mask positions of each call
    costs: tuple[Cost, ...]

    @classmethod
    def of(cls, record: SampleRecord) -> PairCalls | None:
        """None without comparisons, or where a comparison carries no cost (older records)."""
        if not record.comparisons or any(len(c) < 4 for c in record.comparisons):
            return None
        sizes, firsts = mask_groups(record)
        pairs = np.array([[int(c[0]), int(c[1])] for c in record.comparisons], dtype=int)
        return cls(len(record.candidates), sizes, firsts, pairs,
                   tuple(Cost.from_json(c[3]) for c in record.comparisons))

    def spend(self, n: int, estimator: str) -> VerifySpend:
        """Exact (module doc): P(each pair asked), P(each mask shown)."""
        nn = min(n, self.m)
        a, b = self.pairs[:, 0], self.pairs[:, 1]
        d = len(self.sizes)
        partners = np.zeros((d, d), dtype=bool)
        partners[a, b] = partners[b, a] = True
        if estimator == "prefix":
            drawn = self.firsts < nn
            called = (drawn[a] & drawn[b]).astype(float)
            shown = (drawn & (partners & drawn[None, :]).any(axis=1)).astype(float)
        elif estimator == "best_of_n":
            q = miss_probabilities(self.m, nn)
            ga, gb = self.sizes[a], self.sizes[b]
            called = 1.0 - q[ga] - q[gb] + q[ga + gb]
            g_partners = partners.astype(int) @ self.sizes
            shown = np.where(partners.any(axis=1),
                             1.0 - q[self.sizes] - q[g_partners] + q[self.sizes + g_partners],
                             0.0)
        else:
            raise ValueError(f"unknown estimator {estimator!r}")
        return VerifySpend(float(shown.sum()), float(called.sum()), _weighted(self.costs, called))


def listwise_spend(record: SampleRecord, n: int, estimator: str, *, seed: int,
                   draws: Draws) -> VerifySpend | None:
    """The listwise calls of the subsets the evaluation draws at N (module doc); None where the
    record has no choices, or a set it needs carries no cost (older records)."""
    weights = ListwiseWeights.of(record, seed, draws)
    if weights is None or any(len(c) < 3 for c in record.choices):
        return None
    costs = {tuple(int(p) for p in c[0]): Cost.from_json(c[2]) for c in record.choices}
    sets, exact = weights.shown_sets(n, estimator)
    if any(s and s not in costs for s in sets):
        return None
    per = np.array([[len(s), 1.0, costs[s].tokens] if s else [0.0, 0.0, 0.0] for s in sets])
    w = np.full(len(sets), 1.0 / len(sets))
    cost = _weighted([costs[s] if s else Cost() for s in sets], w)
    cov = (np.zeros((3, 3)) if exact or len(sets) < 2
           else np.cov(per.T, ddof=1).reshape(3, 3) / len(sets))
    return VerifySpend(float(per[:, 0].mean()), float(per[:, 1].mean()), cost, cov)


@dataclass(frozen=True)
class PoolCost:
    """One sample's costs as the evaluation reads them: the planner request's own part (prompt,
    call) once, each hypothesis's completion, the executor's prompt groups, the image (one group
    of every executed candidate) and the verifier's mask groups."""

    m: int
    plan_request: Cost
    plan_each: np.ndarray  # (M,) each hypothesis's own completion tokens
    execute: Groups
    image: Groups
    verify: Groups
    recorded: bool  # any cost was recorded (records of an older version carry none)

    @classmethod
    def of(cls, record: SampleRecord) -> PoolCost:
        cands = record.candidates
        if not any(c.cost for c in cands):  # records of an older version: nothing recorded
            none = Groups(np.zeros(0, dtype=int), np.zeros(0, dtype=int), ())
            return cls(len(cands), Cost(), np.zeros(len(cands)), none, none, none, False)
        plan = [(c.cost or {}).get("plan") or {} for c in cands]
        request = max(((int(p.get("prompt_tokens") or 0), int(p.get("calls") or 0))
                       for p in plan), default=(0, 0))
        each = np.array([float(p.get("completion_tokens") or 0) for p in plan])
        by_prompt: dict[str, list[int]] = {}
        by_mask: dict[str, list[int]] = {}
        ex_cost: dict[str, Cost] = {}
        ver_cost: dict[str, Cost] = {}
        for pos, c in enumerate(cands):
            cost = c.cost or {}
            if c.prompt_key is not None and c.failed_stage != "plan":
                by_prompt.setdefault(c.prompt_key, []).append(pos)
                if "execute" in cost:
                    ex_cost[c.prompt_key] = Cost.from_json(cost["execute"])
            if c.mask_key is not None:
                by_mask.setdefault(c.mask_key, []).append(pos)
                if "verify" in cost:
                    ver_cost[c.mask_key] = Cost.from_json(cost["verify"])
        executed = sorted(p for v in by_prompt.values() for p in v)
        image = Groups.of({"image": executed} if executed else {}, {})
        return cls(len(cands), Cost(prompt_tokens=request[0], calls=request[1]), each,
                   Groups.of(by_prompt, ex_cost), image, Groups.of(by_mask, ver_cost),
                   any(c.cost for c in cands))


def expected(pool: PoolCost, n: int, estimator: str, *, verifies: bool = True,
             verified: np.ndarray | None = None, spend: VerifySpend | None = None,
             rates: CostRates | None = None) -> dict[str, float]:
    """Every `QUANTITIES` at N for one sample (N clamped to the pool, as the evaluation does).
    `verifies`: the selector reads the verifier (else the verify stage costs nothing).
    `verified`: P(each of `pool.verify`'s groups is sent to the verifier) where a policy sends
    fewer than every mask drawn (`rescue.policies`); None: every mask drawn is verified.
    `spend`: the verifier's calls where they are not one per mask (pairwise, listwise)."""
    row = expected_grid(pool, [n], estimator, verifies=verifies, rates=rates,
                        spend=None if spend is None else [spend],
                        verified=None if verified is None else np.asarray(verified)[None])[0]
    return dict(zip(QUANTITIES, map(float, row), strict=True))


def _rows_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`a @ b` for (R, G) `a`, each row summed the same way whatever R (a BLAS product's last
    bits depend on the shape: one N alone and a grid of N must give the same number)."""
    if b.ndim == 1:
        return (a * b[None, :]).sum(axis=1)
    return (a[:, :, None] * b[None]).sum(axis=1)


def _represented_grid(m: int, ns: np.ndarray, groups: Groups, estimator: str) -> np.ndarray:
    """(len(ns), G): `represented` at each N."""
    if estimator == "prefix":
        return (groups.firsts[None, :] < ns[:, None]).astype(float)
    if estimator != "best_of_n":
        raise ValueError(f"unknown estimator {estimator!r}")
    return 1.0 - np.stack([miss_probabilities(m, int(n))[groups.sizes] for n in ns])


def expected_grid(pool: PoolCost, ns: Sequence[int], estimator: str, *, verifies: bool = True,
                  rates: CostRates | None = None,
                  spend: Sequence[VerifySpend] | None = None,
                  verified: np.ndarray | None = None) -> np.ndarray:
    """(len(ns), len(QUANTITIES)): `expected` at every N of `ns` in a few products (a study
    evaluates thousands of samples at every N). `spend`: the verifier's calls at each N where
    they are not one per distinct mask drawn; `verified` (len(ns), G): P(each mask group is
    verified) where not every mask drawn is (a policy)."""
    out = np.full((len(ns), len(QUANTITIES)), math.nan)
    if not pool.recorded or pool.m == 0:
        return out
    m = pool.m
    nn = np.minimum(np.asarray(ns, dtype=int), m)
    if estimator == "prefix":
        w = (np.arange(m)[None, :] < nn[:, None]).astype(float)
    else:
        w = np.repeat((nn / m)[:, None], m, axis=1)
    plan = pool.plan_request.tokens + _rows_dot(w, pool.plan_each)
    prompts = (_represented_grid(m, nn, pool.execute, estimator).sum(axis=1)
               if len(pool.execute.sizes) else np.zeros(len(nn)))
    encodes = (_represented_grid(m, nn, pool.image, estimator).sum(axis=1)
               if len(pool.image.sizes) else np.zeros(len(nn)))  # one image, if any prompt
    tok = [_SUMMED.index("prompt_tokens"), _SUMMED.index("completion_tokens")]
    if spend is not None:
        masks = np.array([sp.masks for sp in spend], dtype=float)
        calls = np.array([sp.calls for sp in spend], dtype=float)
        vtokens = np.array([float(sp.cost.tokens) for sp in spend])
    elif len(pool.verify.sizes):
        p = (_represented_grid(m, nn, pool.verify, estimator) if verified is None
             else np.asarray(verified, dtype=float))
        masks = calls = p.sum(axis=1)
        vtokens = _rows_dot(p, pool.verify.matrix)[:, tok].sum(axis=1)
    else:
        masks = calls = vtokens = np.zeros(len(nn))
    if not verifies:
        masks = calls = vtokens = np.zeros(len(nn))
    col = QUANTITIES.index
    out[:, col("plan_tokens")], out[:, col("execute_prompts")] = plan, prompts
    out[:, col("execute_encodes")], out[:, col("verify_masks")] = encodes, masks
    out[:, col("verify_calls")], out[:, col("verify_tokens")] = calls, vtokens
    out[:, col("total_tokens")] = plan + vtokens
    if rates is not None and rates.set:
        pl, ex, v = rates.planner, rates.executor, rates.verifier
        out[:, col("gpu_s")] = ((pl.gpu_s_per_token or 0.0) * plan + (pl.gpu_s_per_call or 0.0)
                                + (ex.gpu_s_per_prompt or 0.0) * prompts
                                + ((ex.gpu_s_per_encode or 0.0) + (ex.gpu_s_per_call or 0.0))
                                * encodes
                                + (v.gpu_s_per_token or 0.0) * vtokens
                                + (v.gpu_s_per_call or 0.0) * calls)
    return out


VERIFIER_CALLS = ("none", "per_mask", "pairwise", "listwise", "unmodelled")
"""How a selector spends the verifier: not at all (`needs_verifier` false), one call per distinct
mask drawn (the verify stage), one per ordered pair of distinct masks drawn (`PairCalls`), one
per subset's set of top-k masks (`listwise_spend`), or in calls this module does not model
(`Selector.verifier_calls`; its verify columns are NaN rather than a wrong number)."""

_VERIFY_COLUMNS = [QUANTITIES.index(q) for q in ("verify_masks", "verify_calls",
                                                  "verify_tokens", "total_tokens", "gpu_s")]


def sample_costs(records: Sequence[SampleRecord], n_grid: Sequence[int],
                 estimators: Sequence[str], rates: CostRates | None,
                 modes: Sequence[str], *, seed: int = 0, draws: Draws | None = None,
                 ) -> dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]]:
    """(mode, estimator, N) -> ((S, len(QUANTITIES)) expected cost per sample, the Monte-Carlo
    variance of each: 0 where exact). A failed sample (no candidates) cost nothing; a record
    without recorded costs is NaN, and so are the verify columns of a pairwise or listwise
    record that lacks its calls' costs. `seed` and `draws`: the evaluation's (listwise)."""
    pools = [None if r.error is not None or not r.candidates else PoolCost.of(r)
             for r in records]
    draws = draws or Draws()
    out: dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]] = {}
    col = {q: QUANTITIES.index(q) for q in QUANTITIES}
    v = (rates or CostRates()).verifier
    gpu = np.array([0.0, v.gpu_s_per_call or 0.0, v.gpu_s_per_token or 0.0])
    for mode in dict.fromkeys(modes):
        if mode not in VERIFIER_CALLS:
            raise ValueError(f"verifier_calls must be one of {VERIFIER_CALLS}, got {mode!r}")
        pairs = ([None if p is None else PairCalls.of(r) for p, r in zip(pools, records,
                                                                           strict=True)]
                 if mode == "pairwise" else [])
        for e in estimators:
            a = np.zeros((len(records), len(n_grid), len(QUANTITIES)))
            var = np.zeros_like(a)
            for row, pool in enumerate(pools):
                if pool is None:
                    continue
                if mode not in ("pairwise", "listwise"):
                    a[row] = expected_grid(pool, n_grid, e, verifies=mode != "none",
                                           rates=rates)
                    continue
                spends = [(None if pairs[row] is None else pairs[row].spend(n, e))
                          if mode == "pairwise" else
                          listwise_spend(records[row], n, e, seed=seed, draws=draws)
                          for n in n_grid]
                a[row] = expected_grid(pool, n_grid, e, rates=rates, spend=[
                    VerifySpend(0.0, 0.0, Cost()) if sp is None else sp for sp in spends])
                for j, sp in enumerate(spends):
                    if sp is None:
                        a[row, j, _VERIFY_COLUMNS] = np.nan
                    elif not sp.exact:
                        c = sp.cov
                        var[row, j, col["verify_masks"]] = c[0, 0]
                        var[row, j, col["verify_calls"]] = c[1, 1]
                        var[row, j, col["verify_tokens"]] = c[2, 2]
                        var[row, j, col["total_tokens"]] = c[2, 2]
                        var[row, j, col["gpu_s"]] = gpu @ c @ gpu
            if mode == "unmodelled":
                a[:, :, _VERIFY_COLUMNS] = np.nan
            if rates is None or not rates.set:
                a[:, :, col["gpu_s"]] = np.nan
            for j, n in enumerate(n_grid):
                out[(mode, e, n)] = (a[:, j], var[:, j])
    return out
