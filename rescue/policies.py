"""Verification policies: verifier selectors that send fewer masks to the verifier.

The plain verifier selector verifies every distinct mask of the N drawn and picks the best
score. A policy decides which of them to verify, picks by verifier score among those only, and
so trades verifier calls and tokens against the risk of never seeing the best mask. Each is
evaluated offline from a full run: the plain verifier needed every verdict, so every verdict a
policy could need is cached and no model is called. The planner and executor work is that of
the N drawn; a policy changes only what reaches the verifier.

- `Prefilter` (consensus pre-filter, top k): rank the subset's distinct masks by consensus
  within the subset (mean IoU with its other working candidates, `rescue.consensus`), verify
  the k best (a tie at the cut goes to the mask drawn first), pick by verifier score among them.
- `EarlyExit`: go through the subset in order, verify each new mask, and stop once k verified
  candidates agree: some verified mask has IoU >= `iou` with k - 1 other verified candidates.
  Candidates are counted, not masks: two hypotheses giving one mask agree (IoU 1), verified once.
  Pick by verifier score among the candidates gone through.
- `UntilConfident`: go through the subset in order and stop at the first verdict whose score
  exceeds `score`; pick it, or (none does: every mask verified) the plain verifier's pick.

Order: hypothesis index order within the subset, never a random order, so a policy depends on
the subset alone and its expectation is over the C(M, N) subsets (what the brute-force tests
enumerate); under `prefix` that is the deployed system, which verifies hypotheses as they come.
Ties among the verified go the plain verifier's way: shared evenly between tied candidates.

A verdict that failed (`failed_stage == "verify"`) is treated as the plain verifier treats it:
the candidate is UNSCORED (below every scored one, above failed ones), so never confident; its
call was made, so it counts as verified at its recorded cost; its mask still votes and agrees.

Exactness: `UntilConfident` has a closed form at every N (`until_confident_best_of_n`).
`Prefilter` and `EarlyExit` enumerate the subsets where there are few, else draw them
(`consensus.estimate_over_subsets`, the consensus selector's draws and standard-error target);
with k >= N they verify everything and are the plain verifier exactly. Their verify cost is the
plain verifier's exact cost less the mean saving over the subsets drawn (a control variate:
never above the plain verifier's, and with less variance than the raw mean); the saving's
Monte-Carlo covariance comes with the estimate (`PolicyEstimate.cost_cov`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np

from rescue import consensus
from rescue.consensus import TIE_TOLERANCE, Draws
from rescue.errors import ConfigError
from rescue.estimators import Ranking, prefix_select_weights
from rescue.expected_cost import PoolCost, miss_probabilities, represented
from rescue.records import CandidateRecord, SampleRecord

ESTIMATE_ROWS = ("intersection", "union", "iou", "verify_masks", "verify_tokens")
"""What a policy estimate's Monte-Carlo covariance is over, in this order."""


@dataclass(frozen=True)
class Pool:
    """One sample as a policy reads it: the plain verifier's `scores` (M,), which candidates
    have a mask (`ok`), their pairwise IoU (`ious`, None for records made before they were
    kept), the verify group (distinct mask) of each candidate (-1: none) and the verify costs."""

    scores: np.ndarray
    ok: np.ndarray
    ious: np.ndarray | None
    group: np.ndarray
    cost: PoolCost

    @classmethod
    def of(cls, record: SampleRecord, scores: np.ndarray) -> Pool:
        cost = PoolCost.of(record)
        pair = consensus.candidate_ious(record)
        ok = np.array([c.ok for c in record.candidates], bool)
        return cls(np.asarray(scores, float), ok if pair is None else pair[1],
                   None if pair is None else pair[0], cost.verify.of_candidates(cost.m), cost)

    @property
    def m(self) -> int:
        return len(self.scores)

    @property
    def groups(self) -> int:
        return len(self.cost.verify.sizes)

    def onehot(self) -> np.ndarray:
        """(M, G): candidate c is in group g."""
        out = np.zeros((self.m, self.groups), bool)
        has = self.group >= 0
        out[np.flatnonzero(has), self.group[has]] = True
        return out

    def members(self, subsets: np.ndarray) -> np.ndarray:
        """(D, M) bool from (D, N) pool positions."""
        out = np.zeros((subsets.shape[0], self.m), bool)
        out[np.arange(subsets.shape[0])[:, None], subsets] = True
        return out

    def pick(self, allowed: np.ndarray) -> np.ndarray:
        """(D, M): the best verifier score among `allowed` (D, M), ties shared evenly, as the
        plain verifier shares them (all failed: shared among them)."""
        keys = np.where(allowed, self.scores, -np.inf)
        best = keys.max(axis=1, keepdims=True)
        win = allowed & (self.scores == best)
        return win / win.sum(axis=1, keepdims=True)

    def plain(self, n: int, estimator: str) -> tuple[np.ndarray, np.ndarray]:
        """The plain verifier's (pick weights, P(each group verified)) at N."""
        w = (Ranking.of(self.scores).best_of_n(n)[0] if estimator == "best_of_n"
             else prefix_select_weights(self.scores, n))
        v = self.cost.verify
        return w, represented(self.m, n, v.sizes, v.firsts, estimator)


Outcome = tuple[np.ndarray, np.ndarray]
"""Per subset: (D, M) pick weights and (D, G) which groups were sent to the verifier."""


class Rule(Protocol):
    """One policy: what it verifies and picks in each subset."""

    name: str
    needs_ious: bool  # it reads the pairwise mask IoUs (records made before them: not scored)

    def plain_at(self, n: int) -> bool:
        """It verifies every mask drawn at N (it is then the plain verifier)."""

    def outcomes(self, pool: Pool, subsets: np.ndarray) -> Outcome:
        """Its pick and verified groups in each subset ((D, N) pool positions, any order)."""

    def best_of_n(self, pool: Pool, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Over uniformly random N-subsets in closed form, (pick weights, P(each group
        verified)); None where there is none (the subsets are then enumerated or drawn)."""


def _verified(pool: Pool, sent: np.ndarray) -> np.ndarray:
    """(D, G) from the (D, M) candidates sent to the verifier (duplicates: one call)."""
    return (sent.astype(float) @ pool.onehot()) > 0


@dataclass(frozen=True)
class Prefilter:
    """Verify the `k` distinct masks of highest consensus within the subset (module doc)."""

    k: int
    name: str = "prefilter"
    needs_ious: bool = True

    def plain_at(self, n: int) -> bool:
        return self.k >= n

    def best_of_n(self, pool: Pool, n: int) -> None:
        return None

    def outcomes(self, pool: Pool, subsets: np.ndarray) -> Outcome:
        assert pool.ious is not None
        members = pool.members(subsets)
        cons = consensus.scores_within(pool.ious, pool.ok, members)  # -inf: not a voter
        d, g = members.shape[0], pool.groups
        score = np.full((d, g), -1.0)  # consensus is >= 0: -1 marks a group not drawn
        first = np.full((d, g), pool.m)
        for j, pos in enumerate(pool.cost.verify.members):
            cols = np.asarray(pos)
            drawn = members[:, cols]
            score[:, j] = np.where(drawn.any(axis=1), cons[:, cols].max(axis=1), -1.0)
            first[:, j] = np.where(drawn, cols, pool.m).min(axis=1)
        drawn_g = first < pool.m
        rank = np.zeros((d, g), int)  # the drawn groups ahead of each: higher, or tied and first
        for h in range(g):
            sh, fh = score[:, h:h + 1], first[:, h:h + 1]
            rank += drawn_g[:, h:h + 1] & ((sh > score + TIE_TOLERANCE) | (
                (np.abs(sh - score) <= TIE_TOLERANCE) & (fh < first)))
        chosen = drawn_g & (rank < self.k)
        has = pool.group >= 0
        in_chosen = np.zeros_like(members)
        in_chosen[:, has] = chosen[:, pool.group[has]]
        allowed = members & (~has | in_chosen)  # failed candidates stay: picked only if all are
        return pool.pick(allowed), chosen


@dataclass(frozen=True)
class EarlyExit:
    """Verify in order until `k` verified candidates agree at IoU >= `iou` (module doc)."""

    k: int
    iou: float
    name: str = "early_exit"
    needs_ious: bool = True

    def plain_at(self, n: int) -> bool:
        return self.k >= n  # k agreeing at the N-th at the earliest: everything verified

    def best_of_n(self, pool: Pool, n: int) -> None:
        return None

    def outcomes(self, pool: Pool, subsets: np.ndarray) -> Outcome:
        assert pool.ious is not None
        subs = np.sort(subsets, axis=1)
        d = subs.shape[0]
        agree = (pool.ious >= self.iou) & pool.ok[:, None] & pool.ok[None, :]
        np.fill_diagonal(agree, False)
        rows = np.arange(d)
        count = np.zeros((d, pool.m))  # per candidate: verified others agreeing with it
        verified = np.zeros((d, pool.m), bool)
        seen = np.zeros((d, pool.m), bool)
        going = np.ones(d, bool)
        for t in range(subs.shape[1]):
            x = subs[:, t]
            seen[rows[going], x[going]] = True
            new = going & pool.ok[x]
            count[new] += agree[x[new]]
            verified[rows[new], x[new]] = True
            going &= ~((count >= self.k - 1) & verified).any(axis=1)
        return pool.pick(seen), _verified(pool, verified & (pool.group >= 0))


@dataclass(frozen=True)
class UntilConfident:
    """Verify in order until a verdict's score exceeds `score`; pick it (module doc)."""

    score: float
    name: str = "until_confident"
    needs_ious: bool = False

    def plain_at(self, n: int) -> bool:
        return n == 1

    def best_of_n(self, pool: Pool, n: int) -> tuple[np.ndarray, np.ndarray]:
        return until_confident_best_of_n(self, pool, n)

    def confident(self, pool: Pool) -> np.ndarray:
        return pool.ok & (pool.scores > self.score)

    def outcomes(self, pool: Pool, subsets: np.ndarray) -> Outcome:
        subs = np.sort(subsets, axis=1)
        d, n = subs.shape
        sure = self.confident(pool)[subs]  # (D, N)
        stops = sure.any(axis=1)
        at = np.where(stops, np.argmax(sure, axis=1), n - 1)
        upto = np.arange(n)[None, :] <= at[:, None]
        seen = np.zeros((d, pool.m), bool)
        seen[np.arange(d)[:, None], subs] = upto
        w = pool.pick(seen)
        w[stops] = 0.0
        w[np.flatnonzero(stops), subs[stops, at[stops]]] = 1.0
        return w, _verified(pool, seen & pool.ok & (pool.group >= 0))


def until_confident_best_of_n(rule: UntilConfident, pool: Pool,
                              n: int) -> tuple[np.ndarray, np.ndarray]:
    """`UntilConfident` over uniformly random N-subsets, exactly: (pick weights, P(each group
    verified)).

    With C the confident candidates, candidate i is the first confident one drawn with
    P(i drawn, none of the a_i confident before it drawn) = (N/M) C(M-1-a_i, N-1) / C(M-1, N-1);
    none is drawn with P = C(M-|C|, N) / C(M, N), and then the pick is the plain verifier's
    over a uniform N-subset of the others. A group g is verified iff the first candidate drawn
    of g ∪ C is in g, so P(g) = sum over j in g of (N/M) C(M-1-b_j, N-1) / C(M-1, N-1), b_j the
    members of g ∪ C before j.
    """
    m = pool.m
    sure = rule.confident(pool)
    # first[b] = P(a given candidate is drawn and none of b given others is)
    first = (n / m) * (miss_probabilities(m - 1, n - 1) if n > 1 else np.ones(m))
    w = np.where(sure, first[np.cumsum(sure) - sure], 0.0)
    others = np.flatnonzero(~sure)
    if n <= len(others):
        none = miss_probabilities(m, n)[int(sure.sum())]
        w[others] += none * Ranking.of(pool.scores[others]).best_of_n(n)[0]
    p = np.zeros(pool.groups)
    for g, pos in enumerate(pool.cost.verify.members):
        stop = sure.copy()
        stop[list(pos)] = True
        before = np.cumsum(stop) - stop
        p[g] = first[before[list(pos)]].sum()
    return w, p


@dataclass(frozen=True)
class PolicyEstimate:
    """A policy at N for one sample: P(each candidate is the pick) (M,), P(each verify group
    is sent to the verifier) (G,), `draws` (0: exact) and the Monte-Carlo covariance (5, 5) of
    the estimate's expected `ESTIMATE_ROWS` (zeros when exact)."""

    weights: np.ndarray
    verified: np.ndarray
    draws: int
    cov: np.ndarray

    @property
    def exact(self) -> bool:
        return self.draws == 0


def _rng(name: str, seed: int, sample_id: str, n: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{name}|{seed}|{sample_id}|{n}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class SamplePolicy:
    """One rule on one sample, as the evaluation reads it (`estimate`)."""

    rule: Rule
    pool: Pool
    sample_id: str
    seed: int
    draws: Draws

    def estimate(self, n: int, estimator: str, values: np.ndarray) -> PolicyEstimate:
        """At N (clamped to the pool) under `estimator`; `values` (3, M): each candidate's I, U
        and IoU, whose expectation under the pick sets the number of draws (module doc)."""
        pool, rule = self.pool, self.rule
        n = min(n, pool.m)
        zero = np.zeros((len(ESTIMATE_ROWS),) * 2)
        if rule.plain_at(n):
            return PolicyEstimate(*pool.plain(n, estimator), 0, zero)
        if estimator == "prefix":
            w, sent = rule.outcomes(pool, np.arange(n)[None])
            return PolicyEstimate(w[0], sent[0].astype(float), 0, zero)
        closed = rule.best_of_n(pool, n)
        if closed is not None:
            return PolicyEstimate(*closed, 0, zero)
        _, every = pool.plain(n, estimator)
        onehot = pool.onehot().astype(float)
        m, g = pool.m, pool.groups
        tokens = np.array([c.tokens for c in pool.cost.verify.costs], float)

        def saved(subsets: np.ndarray) -> np.ndarray:
            w, sent = rule.outcomes(pool, subsets)
            drawn = (pool.members(subsets).astype(float) @ onehot) > 0
            return np.hstack([w, drawn & ~sent])

        values_all = np.zeros((len(ESTIMATE_ROWS), m + g))
        values_all[:3, :m] = values
        values_all[3, m:], values_all[4, m:] = 1.0, tokens
        d = self.draws
        est = consensus.estimate_over_subsets(
            saved, m, n, values_all, pilot=d.pilot, target_var=d.target_var,
            max_draws=d.max_draws, rng=lambda: _rng(rule.name, self.seed, self.sample_id, n),
            key=ESTIMATE_ROWS.index("iou"), first=d.first)
        return PolicyEstimate(est.weights[:m], every - est.weights[m:], est.draws, est.cov)


Scores = Callable[..., np.ndarray]
"""The plain verifier's pool scores (`rescue.selection`'s), `(candidates, key=, seed=)`."""


@dataclass(frozen=True)
class Policy:
    """A rule as `rescue.selection.Selector.policy` holds it: per record, its `SamplePolicy`
    (None where the record lacks what the rule reads: pairwise IoUs for `Prefilter` and
    `EarlyExit`; the sample is then scored as the plain verifier) and the single answer."""

    rule: Rule
    scores: Scores

    def __call__(self, record: SampleRecord, seed: int, draws: Draws) -> SamplePolicy | None:
        pool = self.pool(record, seed)
        if pool.ious is None and self.rule.needs_ious:
            return None
        return SamplePolicy(self.rule, pool, record.sample_id, seed, draws)

    def pool(self, record: SampleRecord, seed: int = 0) -> Pool:
        cands: Sequence[CandidateRecord] = record.candidates
        return Pool.of(record, self.scores(cands, key=record.sample_id, seed=seed))

    def answer_scores(self, record: SampleRecord) -> np.ndarray:
        """The single answer: the rule over the whole pool in index order, as scores (the
        pick's weight; -inf for the others and for failed candidates)."""
        got = self(record, 0, Draws())
        if got is None:
            return self.pool(record).scores
        w = got.estimate(len(record.candidates), "prefix", np.zeros((3, got.pool.m))).weights
        return np.where((w > 0) & got.pool.ok, w, -np.inf)


@dataclass(frozen=True)
class PolicyParams:
    """`selection.policy`: each rule's parameter (module doc)."""

    prefilter_k: int = 4
    early_exit_k: int = 3
    early_exit_iou: float = 0.8
    confident_score: float = 0.8

    def __post_init__(self) -> None:
        for name in ("prefilter_k", "early_exit_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"selection.policy.{name} must be >= 1, got "
                                  f"{getattr(self, name)}")
        if not 0.0 <= self.early_exit_iou <= 1.0:
            raise ConfigError(f"selection.policy.early_exit_iou must be in [0, 1], got "
                              f"{self.early_exit_iou}")
        if not np.isfinite(self.confident_score):
            raise ConfigError(f"selection.policy.confident_score must be finite, got "
                              f"{self.confident_score}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> PolicyParams:
        d = dict(cfg or {})
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown selection.policy keys {unknown}; valid: "
                              f"{', '.join(known)}")
        return cls(**{k: (int(v) if known[k] == "int" else float(v)) for k, v in d.items()})

    def rules(self) -> tuple[Rule, ...]:
        return (Prefilter(self.prefilter_k), EarlyExit(self.early_exit_k, self.early_exit_iou),
                UntilConfident(self.confident_score))
