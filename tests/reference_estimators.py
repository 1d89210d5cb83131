"""Test-only reference estimators: best-of-N weights of one score vector, the prefix draw,
expected counts, and a Monte-Carlo best-of-N that the exact estimator is checked against.

The evaluation itself uses `rescue.estimators.Ranking` and `prefix_select_weights`; these are
the plain forms the tests state their claims in.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rescue.estimators import Ranking

ScoreFn = Callable[[np.ndarray], np.ndarray]
"""Scores of the candidates in a subset (given as pool indices): a subset-dependent selector."""


def _keys(scores: np.ndarray) -> np.ndarray:
    keys = np.asarray(scores, dtype=float)
    return np.where(np.isnan(keys), -np.inf, keys)


def _check_n(m: int, n: int) -> None:
    if not 1 <= n <= m:
        raise ValueError(f"N={n} is outside 1..M={m}")


def best_of_n_weights(scores: np.ndarray, n: int) -> np.ndarray:
    """P(candidate k is the selector's pick among a uniformly random N-subset of the pool).

    Higher score = preferred. Sums to 1 over the pool; N = 1 gives the uniform 1/M; N = M gives
    the argmax (shared among ties). O(M log M) per pool.
    """
    scores = np.asarray(scores, dtype=float)
    if scores.ndim not in (1, 2):
        raise ValueError(f"scores must have shape (M,) or (B, M), got {scores.shape}")
    _check_n(scores.shape[-1], n)
    w = Ranking.of(scores).best_of_n(n)
    return w[0] if scores.ndim == 1 else w


def prefix_weights(m: int, n: int) -> np.ndarray:
    """Which candidates the prefix estimator draws: 1/N on each of the first N, 0 elsewhere.

    It is also the prefix estimator's answer for a selector that cannot tell candidates apart
    (all scores tied); with scores, use `prefix_select_weights`.
    """
    _check_n(m, n)
    w = np.zeros(m)
    w[:n] = 1.0 / n
    return w


def expected_counts(
    weights: np.ndarray, intersection: np.ndarray, union: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """E[I] and E[U] of the selected candidate (over the last axis); floats, one per pool."""
    w = np.asarray(weights, dtype=float)
    return (
        np.sum(w * np.asarray(intersection, dtype=float), axis=-1),
        np.sum(w * np.asarray(union, dtype=float), axis=-1),
    )


def monte_carlo_best_of_n(
    scores: np.ndarray | ScoreFn,
    values: np.ndarray,
    n: int,
    draws: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo mean and standard error of `values` at the pick among random N-subsets.

    `scores` is either a score per pool candidate, or a function from a subset (pool indices) to
    the scores of those candidates — a selector whose scores depend on the subset, such as
    consensus within the subset, which the exact estimator cannot express. Ties are broken
    uniformly at random. `values` has shape (M,) or (M, K); results have shape () or (K,).
    """
    values = np.asarray(values, dtype=float)
    m = values.shape[0]
    _check_n(m, n)
    if draws < 2:
        raise ValueError("need at least 2 draws for a standard error")
    subsets = np.argpartition(rng.random((draws, m)), n - 1, axis=1)[:, :n]
    if callable(scores):
        sub_keys = np.stack([_keys(scores(s)) for s in subsets])
    else:
        keys = _keys(scores)
        if keys.shape != (m,):
            raise ValueError(f"scores shape {keys.shape} does not match values {values.shape}")
        sub_keys = keys[subsets]
    top = sub_keys == sub_keys.max(axis=1, keepdims=True)
    tiebreak = (rng.random(top.shape) + 1.0) * top  # positive exactly on the tied maxima
    picks = subsets[np.arange(draws), np.argmax(tiebreak, axis=1)]
    v = values[picks]
    return v.mean(axis=0), v.std(axis=0, ddof=1) / np.sqrt(draws)
