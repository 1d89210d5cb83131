"""Mask consensus: a candidate is preferred when the other candidates agree with it.

Consensus depends on which candidates are drawn, so best-of-N for it cannot use the exact rank
formula of `rescue.estimators`: a candidate's score in an N-subset is its mean IoU with the
subset's other working candidates. At N = 2 two masks agree with each other equally, so
consensus cannot choose; scoring against the whole pool of M instead would let N = 2 peek at M
candidates and overstate it. This module computes the selection weights within subsets: exactly
in closed form at N = 1 and 2 (`closed_form`) and for N = M and the prefix estimator (one
subset), by enumeration when there are few enough subsets, else by a seeded Monte-Carlo average
over random subsets. `ConsensusBatch` does all of it for many samples of one pool size at once
(the evaluation's case), with the per-sample results.

How many draws (`estimate`): a pilot of `pilot` draws measures the variance of the pick's IoU
over subsets; the draws then grow until the sample's Monte-Carlo variance is at most
`target_var` (the evaluation sets it so that the gIoU over all samples has a Monte-Carlo
standard error of at most `selection.consensus_se`), capped at `max_draws`; where that many
draws would reach every subset, the subsets are enumerated instead (exact). Each estimate
carries the Monte-Carlo covariance of the pick's expected I, U and IoU, from which
`rescue.evaluation` reports the standard errors of gIoU and cIoU.

The pairwise IoU of a sample's distinct masks is kept in its record (`SampleRecord.masks`,
`mask_iou`), so this needs no mask and no model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import combinations
from math import comb

import numpy as np

from rescue.records import SampleRecord

TIE_TOLERANCE = 1e-9


def candidate_ious(record: SampleRecord) -> tuple[np.ndarray, np.ndarray] | None:
    """(M, M) IoU between candidates (duplicates of one mask agree perfectly) and the (M,)
    mask of candidates that have a mask; None for records made before masks were kept."""
    if not record.masks or len(record.mask_iou) != len(record.masks):
        return None
    pos = {d: k for k, d in enumerate(record.masks)}
    idx = np.array([pos.get(c.mask_key, -1) if c.ok else -1 for c in record.candidates],
                   dtype=np.intp)
    ok = idx >= 0
    pair = np.asarray(record.mask_iou, dtype=float)
    out = pair[idx[:, None], idx]  # -1 (no mask) wraps around: cleared next
    out[~ok] = 0
    out[:, ~ok] = 0
    return out, ok


def scores_within(ious: np.ndarray, ok: np.ndarray, members: np.ndarray) -> np.ndarray:
    """(D, M) consensus of each member of each subset (`members`: (D, M) bool): its mean IoU
    with the subset's other working candidates (0 when it is the only one); -inf for
    non-members and for candidates without a mask. One matrix product per batch of subsets.
    Batched alike over leading axes: `ious` (B, M, M), `ok` (B, M), `members` (B, D, M)."""
    voters = members & ok[..., None, :]
    # a voter's others are the subset's other voters, as many for each voter of a row; a lone
    # voter's votes are 0 (its own IoU taken away), so dividing by 1 leaves it 0
    others = np.maximum(voters.sum(axis=-1, keepdims=True) - 1, 1)
    votes = voters.astype(float) @ np.swapaxes(ious, -1, -2)
    votes -= np.diagonal(ious, axis1=-2, axis2=-1)[..., None, :]
    votes /= others
    return np.where(voters, votes, -np.inf)


def pool_scores(ious: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Consensus of every candidate within the whole pool (the single answer's scores)."""
    return scores_within(ious, ok, np.ones((1, len(ok)), bool))[0]


def pick_weights(ious: np.ndarray, ok: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """(D, M) weights: row d is the consensus pick within `subsets[d]`, ties shared evenly; a
    subset with no working candidate shares its weight over all its members."""
    members = np.zeros((subsets.shape[0], len(ok)), bool)
    members[np.arange(subsets.shape[0])[:, None], subsets] = True
    return pick_weights_of(ious, ok, members)


def pick_weights_of(ious: np.ndarray, ok: np.ndarray, members: np.ndarray) -> np.ndarray:
    """`pick_weights` of subsets given as (D, M) membership (batched as `scores_within`)."""
    score = scores_within(ious, ok, members)
    best = score.max(axis=-1, keepdims=True)
    # equal means may differ in the last bits after a matrix product; stored IoUs have 6
    # decimals, so distinct means differ by more than 1e-9 for any pool under 1000
    win = np.where(np.isfinite(best), score >= best - TIE_TOLERANCE, members)
    return win / win.sum(axis=-1, keepdims=True)


def subsets_of(m: int, n: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """Every N-subset of M when there are at most `draws`, else `draws` uniform ones."""
    if n >= m:
        return np.arange(m)[None]
    if comb(m, n) <= draws:
        return _every(m, n)
    return _draw(rng, draws, m, n)


def _every(m: int, n: int) -> np.ndarray:
    """Every N-subset of M, (C(M, N), N); the whole pool where N >= M."""
    if n >= m:
        return np.arange(m)[None]
    return np.array(list(combinations(range(m), n)))


def _draw(rng: np.random.Generator, draws: int, m: int, n: int) -> np.ndarray:
    """`draws` uniform N-subsets of M: the positions of the N smallest of M uniform keys (the
    set argsort's first N would give, found in linear time; order within a subset is free)."""
    return np.argpartition(rng.random((draws, m)), n - 1, axis=1)[:, :n]


def closed_form(ious: np.ndarray, ok: np.ndarray, n: int) -> np.ndarray | None:
    """Exact best-of-N weights without enumerating subsets where N < M has a closed form, else
    None; batched alike over leading axes (`ious` (B, M, M), `ok` (B, M) -> (B, M)).

    N = 1: every candidate is its own pick, 1/M each. N = 2: in {i, j} with both masks, i scores
    its IoU with j (as `scores_within` computes it), ties shared; a mask beats no mask; two
    without masks share. The mean over the C(M, 2) pairs sums each candidate's pair weights
    (0, 1/2 or 1: the sum is exact), so it equals enumeration bit for bit, and replaces the
    Monte-Carlo average where C(M, 2) exceeds the enumeration threshold."""
    m = ok.shape[-1]
    if n >= m or n > 2:
        return None
    if n == 1:
        return np.full(ok.shape, 1 / m)
    diag = np.diagonal(ious, axis1=-2, axis2=-1)[..., :, None]
    s = (ious + diag) - diag  # s[i, j]: i's votes within {i, j}, less its own IoU, over 1 other
    # i wins {i, j} (both with masks) unless j scores more than the tolerance above it
    win = (s >= np.swapaxes(s, -1, -2) - TIE_TOLERANCE) & ok[..., None, :] & ~np.eye(m, dtype=bool)
    wins = np.count_nonzero(win, axis=-1)
    ties = np.count_nonzero(win & np.swapaxes(win, -1, -2), axis=-1)
    bad = m - np.count_nonzero(ok, axis=-1)[..., None]  # pairs with a candidate without a mask
    total = np.where(ok, wins - 0.5 * ties + bad, 0.5 * (bad - 1))
    return total / comb(m, 2)


def best_of_n_within(ious: np.ndarray, ok: np.ndarray, n: int, *, draws: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Probability that each candidate is the consensus pick of a uniformly random N-subset."""
    exact = closed_form(ious, ok, n)
    if exact is not None:
        return exact
    return pick_weights(ious, ok, subsets_of(len(ok), n, draws, rng)).mean(axis=0)


def prefix_within(ious: np.ndarray, ok: np.ndarray, n: int) -> np.ndarray:
    """The consensus pick among the first N candidates (exact)."""
    return pick_weights(ious, ok, np.arange(min(n, len(ok)))[None])[0]


def rng_for(seed: int, sample_id: str, n: int) -> np.random.Generator:
    """Draws fixed by (seed, sample, N): reruns and record order change nothing."""
    digest = hashlib.sha256(f"consensus|{seed}|{sample_id}|{n}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


BATCH = 4096
"""Subsets drawn per matrix product: bounds memory at (BATCH, M) whatever the draw count."""


@dataclass(frozen=True)
class SubsetEstimate:
    """A sample's selection weights at N and how exact they are: `draws` 0 when every subset
    was enumerated; `cov` the Monte-Carlo covariance (K, K) of `weights @ values.T`, the
    estimate's expected values (zeros when exact)."""

    weights: np.ndarray
    draws: int
    cov: np.ndarray

    @property
    def exact(self) -> bool:
        return self.draws == 0


def estimate_best_of_n(ious: np.ndarray, ok: np.ndarray, n: int, values: np.ndarray, *,
                       pilot: int, target_var: float, max_draws: int,
                       rng: np.random.Generator | Callable[[], np.random.Generator],
                       first: int | None = None) -> SubsetEstimate:
    """Best-of-N consensus weights with their Monte-Carlo error (module doc: how many draws).

    `values` (K, M): per-candidate quantities whose expectation under the pick is wanted (the
    evaluation passes I, U and IoU; the last row sets the draw count)."""
    exact = closed_form(ious, ok, n)
    if exact is not None:
        k = values.shape[0]
        return SubsetEstimate(exact, 0, np.zeros((k, k)))
    return estimate_over_subsets(lambda subsets: pick_weights(ious, ok, subsets), len(ok), n,
                                 values, pilot=pilot, target_var=target_var,
                                 max_draws=max_draws, rng=rng, first=first)


Outcomes = Callable[[np.ndarray], np.ndarray]
"""(D, N) subsets (pool positions, in no particular order) -> (D, W): what each subset gives,
e.g. the pick's weights over the M candidates (W = M), to be averaged over subsets."""


def estimate_over_subsets(outcomes: Outcomes, m: int, n: int, values: np.ndarray, *,
                          pilot: int, target_var: float, max_draws: int,
                          rng: np.random.Generator | Callable[[], np.random.Generator],
                          key: int = -1, first: int | None = None) -> SubsetEstimate:
    """The mean of `outcomes` over uniformly random N-subsets of M, and the Monte-Carlo
    covariance of `mean @ values.T` (`values`: (K, W)): every subset where there are at most
    `pilot` (or as many as the draws would need), else `first` seeded draws (default `pilot`;
    `pilot` where there is no `target_var`) and more until the variance of row `key` of
    `values` is at most `target_var`, at least `first` and at most `max_draws` (module doc).
    `rng` may be a function making it, called only where subsets are drawn. Consensus is one
    user; `rescue.policies` another."""
    k = values.shape[0]
    total = comb(m, n) if n < m else 1
    if total <= pilot:
        w = outcomes(_every(m, n)).mean(axis=0)
        return SubsetEstimate(w, 0, np.zeros((k, k)))
    rng = rng() if callable(rng) else rng
    start = pilot if first is None or target_var <= 0 else min(first, pilot)
    rows = outcomes(_draw(rng, start, m, n))
    return _go_on(outcomes, m, n, values, rows, rows @ values.T, target_var=target_var,
                  max_draws=max_draws, rng=rng, key=key)


def _go_on(outcomes: Outcomes, m: int, n: int, values: np.ndarray, rows: np.ndarray,
           x: np.ndarray, *, target_var: float, max_draws: int, rng: np.random.Generator,
           key: int) -> SubsetEstimate:
    """`estimate_over_subsets` after its first draws (`rows`, their values `x`: (D, K)): as
    many more as the variance they measure asks for, or every subset where that is fewer."""
    k, start = values.shape[0], rows.shape[0]
    total = comb(m, n) if n < m else 1
    need = start
    var = float(x[:, key].var(ddof=1))
    if target_var > 0 and var > 0:
        need = min(max_draws, max(start, math.ceil(var / target_var)))
    if need > start and total <= need:  # as many draws as subsets: enumerate instead
        w = outcomes(_every(m, n)).mean(axis=0)
        return SubsetEstimate(w, 0, np.zeros((k, k)))
    w_sum, x_sum, xx_sum, done = rows.sum(axis=0), x.sum(axis=0), x.T @ x, start
    while done < need:
        batch = min(BATCH, need - done)
        rows = outcomes(_draw(rng, batch, m, n))
        x = rows @ values.T
        w_sum, x_sum, xx_sum, done = (w_sum + rows.sum(axis=0), x_sum + x.sum(axis=0),
                                      xx_sum + x.T @ x, done + batch)
    mean = x_sum / done
    cov = (xx_sum - done * np.outer(mean, mean)) / (done - 1) / done
    return SubsetEstimate(w_sum / done, done, cov)


@dataclass(frozen=True)
class Draws:
    """How consensus within subsets is averaged where enumeration is too costly: enumeration
    wherever there are at most `pilot` subsets; else `first` draws (None: `pilot`) to measure
    the variance, more until the Monte-Carlo variance is at most `target_var`, never more than
    `max_draws`. The arena and listwise draw `pilot` subsets, a fixed set a run can ask for."""

    pilot: int = 256
    target_var: float = 0.0
    max_draws: int = 65536
    first: int | None = None


@dataclass(frozen=True)
class SubsetConsensus:
    """One sample's consensus weights within subsets (`rescue.selection.SubsetWeights`)."""

    ious: np.ndarray
    ok: np.ndarray
    sample_id: str
    seed: int
    draws: Draws

    @classmethod
    def of(cls, record: SampleRecord, seed: int, draws: Draws) -> SubsetConsensus | None:
        """None for records made before pairwise mask IoUs were kept (scored over the pool)."""
        pool = candidate_ious(record)
        return None if pool is None else cls(*pool, record.sample_id, seed, draws)

    def best_of_n(self, n: int) -> np.ndarray:
        return best_of_n_within(self.ious, self.ok, n, draws=self.draws.pilot,
                                rng=rng_for(self.seed, self.sample_id, n))

    def estimate(self, n: int, values: np.ndarray) -> SubsetEstimate:
        d = self.draws
        return estimate_best_of_n(self.ious, self.ok, n, values, pilot=d.pilot,
                                  target_var=d.target_var, max_draws=d.max_draws,
                                  rng=lambda: rng_for(self.seed, self.sample_id, n),
                                  first=d.first)

    @staticmethod
    def batch(subs: Sequence[SubsetConsensus]) -> ConsensusBatch:
        return ConsensusBatch(tuple(subs))

    @cached_property
    def _prefixes(self) -> np.ndarray:
        """(M, M): row n-1 is the pick among the first n, for every n in one product."""
        m = len(self.ok)
        return pick_weights_of(self.ious, self.ok, np.tri(m, dtype=bool))

    def prefix(self, n: int) -> np.ndarray:
        return self._prefixes[min(n, len(self.ok)) - 1]


def estimate_all(subs: Sequence[SubsetConsensus], n: int,
                 values: Sequence[np.ndarray]) -> list[SubsetEstimate]:
    """`[sub.estimate(n, v) for sub, v in zip(subs, values)]`, batched (`ConsensusBatch`)."""
    return ConsensusBatch(tuple(subs)).estimate(n, values)


CHUNK = 1 << 22
"""Elements of (samples, subsets, M) scored per product where a batch enumerates subsets."""


@dataclass(frozen=True)
class ConsensusBatch:
    """Many samples' `SubsetConsensus` scored together (`rescue.selection.SubsetBatch`): where
    they share a pool size and `Draws` (the evaluation's case, where one product per sample
    would cost more in calls than in arithmetic), one product per N for all of them; else one
    by one. Each sample draws from its own generator in the same order, so every estimate is
    the sample's own `estimate` (tests: the same weights, draws and covariance)."""

    subs: tuple[SubsetConsensus, ...]

    @cached_property
    def uniform(self) -> bool:
        if not self.subs:
            return False
        m, d = len(self.subs[0].ok), self.subs[0].draws
        return all(len(s.ok) == m and s.draws == d for s in self.subs)

    @cached_property
    def ious(self) -> np.ndarray:
        return np.stack([s.ious for s in self.subs])

    @cached_property
    def ok(self) -> np.ndarray:
        return np.stack([s.ok for s in self.subs])

    @cached_property
    def _prefixes(self) -> np.ndarray:
        """(B, M, M): row n-1 of sample b is its pick among its first n, in one product."""
        m = self.ok.shape[1]
        return pick_weights_of(self.ious, self.ok, np.tri(m, dtype=bool))

    def prefix(self, n: int) -> np.ndarray:
        """(B, M): each sample's `prefix(n)`."""
        if not self.uniform:
            return np.stack([s.prefix(n) for s in self.subs])
        return self._prefixes[:, min(n, self.ok.shape[1]) - 1]

    def estimate(self, n: int, values: Sequence[np.ndarray]) -> list[SubsetEstimate]:
        """Each sample's `estimate(n, values[b])`."""
        if not self.uniform:
            return [s.estimate(n, v) for s, v in zip(self.subs, values, strict=True)]
        vals = np.asarray(values)  # (B, K, M)
        b, k, m = vals.shape
        d = self.subs[0].draws
        exact = (self.prefix(m) if n >= m else closed_form(self.ious, self.ok, n))
        if exact is None and comb(m, n) <= d.pilot:
            exact = self._enumerated(n)
        if exact is not None:
            cov = np.zeros((b, k, k))
            return [SubsetEstimate(w, 0, c) for w, c in zip(exact, cov, strict=True)]
        start = None if d.first is None or d.target_var <= 0 else min(d.first, d.pilot)
        if start is None:
            return [s.estimate(n, v) for s, v in zip(self.subs, vals, strict=True)]
        rngs = [rng_for(s.seed, s.sample_id, n) for s in self.subs]
        keys = np.empty((b, start, m))
        for g, out in zip(rngs, keys, strict=True):
            g.random(out=out)
        rows = pick_weights_of(self.ious, self.ok, _smallest(keys, n))  # (B, start, M)
        xs = rows @ np.swapaxes(vals, -1, -2)  # (B, start, K)
        return self._go_on(n, vals, rows, xs, rngs)

    def _enumerated(self, n: int) -> np.ndarray:
        """(B, M): the mean pick over every N-subset, for every sample."""
        every = _every(self.ok.shape[1], n)
        members = np.zeros((len(every), self.ok.shape[1]), bool)
        members[np.arange(len(every))[:, None], every] = True
        step = max(1, CHUNK // members.size)
        return np.concatenate([
            pick_weights_of(self.ious[i:i + step], self.ok[i:i + step], members).mean(axis=1)
            for i in range(0, len(self.subs), step)])

    def _go_on(self, n: int, vals: np.ndarray, rows: np.ndarray, xs: np.ndarray,
               rngs: Sequence[np.random.Generator]) -> list[SubsetEstimate]:
        """`_go_on` for every sample: the draw counts from the first draws' variances at once;
        the samples whose first draws suffice finished together, the rest one by one."""
        _, start, m = rows.shape
        d = self.subs[0].draws
        var = xs[..., -1].var(axis=1, ddof=1)
        grow = (var > 0) & (np.ceil(var / d.target_var) > start) & (d.max_draws > start)
        w = rows.sum(axis=1) / start
        mean = xs.sum(axis=1) / start
        xx = np.swapaxes(xs, -1, -2) @ xs
        cov = (xx - start * (mean[:, :, None] * mean[:, None, :])) / (start - 1) / start
        out = [SubsetEstimate(row, start, c) for row, c in zip(w, cov, strict=True)]
        for i in np.flatnonzero(grow):
            sub = self.subs[i]
            out[i] = _go_on(lambda subsets, s=sub: pick_weights(s.ious, s.ok, subsets), m, n,
                            vals[i], rows[i], xs[i], target_var=d.target_var,
                            max_draws=d.max_draws, rng=rngs[i], key=-1)
        return out


def _smallest(keys: np.ndarray, n: int) -> np.ndarray:
    """Membership (..., M) of the N smallest keys of each row: the subsets `_draw` takes from
    the same keys (the set of argpartition's first N), by partition and compare (faster);
    argpartition itself on a row with a tie at its N-th key."""
    members = keys <= np.partition(keys, n - 1, axis=-1)[..., n - 1:n]
    tied = np.count_nonzero(members, axis=-1) != n
    if tied.any():
        fix = np.zeros((int(tied.sum()), keys.shape[-1]), bool)
        np.put_along_axis(fix, np.argpartition(keys[tied], n - 1, axis=-1)[:, :n], True,
                          axis=-1)
        members[tied] = fix
    return members


def rows_estimate(rows: np.ndarray, values: np.ndarray, *, exact: bool) -> SubsetEstimate:
    """The estimate from per-subset pick weights `rows` (D, M) — every subset when `exact`,
    else D uniform draws — for a selector that picks within subsets by other means (the
    arena, listwise marks): the mean, and the Monte-Carlo covariance of `values`' mean."""
    k = values.shape[0]
    if exact:
        return SubsetEstimate(rows.mean(axis=0), 0, np.zeros((k, k)))
    x = rows @ values.T
    return SubsetEstimate(rows.mean(axis=0), rows.shape[0],
                          np.cov(x.T, ddof=1).reshape(k, k) / rows.shape[0])
