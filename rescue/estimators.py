"""Best-of-N from one cached pool of M candidates, exactly, without subsampling noise.

A run generates M = max_n candidates per sample once. "Best of N" is the candidate a selector
prefers among a uniformly random N-subset of the pool; its expected IoU is a weighted sum over the
pool, with weights that depend only on each candidate's rank:

    P(rank j is the best of the subset) = C(M-1-j, N-1) / C(M, N)     (j = 0 is the best)

(the subset must contain rank j and N-1 of the M-1-j candidates ranked below it). Candidates tied
in score are picked uniformly among the tied ones, so a tied group shares its total probability
evenly. Non-finite scores (NaN, -inf: failed candidates) rank last, tied with each other.

The prefix estimator ("the first N", what a deployed system with budget N does) applies the
selector to candidates 0..N-1 instead.

Every function takes one pool (shape (M,)) or a batch of pools of equal size (shape (B, M)) and
returns weights of the same shape, in the candidates' original order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ESTIMATORS = ("best_of_n", "prefix")
"""best_of_n: the exact expectation over uniformly random N-subsets; prefix: the first N."""


def _keys(scores: np.ndarray) -> np.ndarray:
    keys = np.asarray(scores, dtype=float)
    return np.where(np.isnan(keys), -np.inf, keys)


def _check_n(m: int, n: int) -> None:
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}")
    if n > m:
        raise ValueError(f"N={n} exceeds the pool of M={m} candidates")


def rank_probabilities(m: int, n: int) -> np.ndarray:
    """P(rank j is the best of a uniform N-subset of M), j = 0..M-1, with ties broken arbitrarily.

    Computed by the ratio p[j+1] / p[j] = (M-N-j) / (M-1-j) from p[0] = N/M: every factor is in
    [0, 1], so nothing overflows for any M, and tail terms underflow harmlessly to 0.
    """
    _check_n(m, n)
    j = np.arange(m - 1, dtype=float)
    ratios = np.maximum((m - n - j) / (m - 1 - j), 0.0)
    p = (n / m) * np.concatenate([[1.0], np.cumprod(ratios)])
    return p / p.sum()


@dataclass(frozen=True)
class Ranking:
    """Pools sorted by score, with the tie groups found once, reusable for every N.

    `order[b, r]` is the candidate at rank r of pool b; `start[b, r]` and `end[b, r]` bound the
    tie group holding rank r (ranks start..end-1).
    """

    order: np.ndarray
    start: np.ndarray
    end: np.ndarray

    @classmethod
    def of(cls, scores: np.ndarray) -> Ranking:
        keys = np.atleast_2d(_keys(scores))
        b, m = keys.shape
        order = np.argsort(-keys, axis=1, kind="stable")
        ranked = np.take_along_axis(keys, order, axis=1)
        idx = np.broadcast_to(np.arange(m), (b, m))
        first = np.ones((b, m), dtype=bool)
        first[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
        last = np.ones((b, m), dtype=bool)
        last[:, :-1] = first[:, 1:]
        start = np.maximum.accumulate(np.where(first, idx, 0), axis=1)
        end = np.minimum.accumulate(np.where(last, idx, m)[:, ::-1], axis=1)[:, ::-1] + 1
        return cls(order=order, start=start, end=end)

    @property
    def m(self) -> int:
        return int(self.order.shape[1])

    def best_of_n(self, n: int) -> np.ndarray:
        """(B, M) weights, in original candidate order."""
        p = rank_probabilities(self.m, n)
        # tail[j] = sum of p[j:]; a group's mass is a difference of tails, which stays accurate
        # where the probabilities are tiny (the bottom of the ranking).
        tail = np.concatenate([np.cumsum(p[::-1])[::-1], [0.0]])
        w_ranked = (tail[self.start] - tail[self.end]) / (self.end - self.start)
        w = np.empty_like(w_ranked)
        np.put_along_axis(w, self.order, w_ranked, axis=1)
        return w


def prefix_select_weights(scores: np.ndarray, n: int) -> np.ndarray:
    """The selector applied to the first N candidates: their argmax, shared evenly among ties."""
    keys = _keys(scores)
    if keys.ndim not in (1, 2):
        raise ValueError(f"scores must have shape (M,) or (B, M), got {keys.shape}")
    _check_n(keys.shape[-1], n)
    head = keys[..., :n]
    top = head == head.max(axis=-1, keepdims=True)  # all -inf: every one ties, shared evenly
    w = np.zeros(keys.shape)
    w[..., :n] = top / top.sum(axis=-1, keepdims=True)
    return w
