"""Selectors: a score per candidate of one sample's pool; higher is preferred.

Every selector gives failed candidates (no mask: failed at plan or execute, `not c.ok`) -inf, so
a working candidate always wins over a failed one; among failed ones the tie is shared (they all
count as an empty prediction anyway). A working candidate that lacks the score a selector reads
(its verification failed, or an executor reports no confidence) gets `UNSCORED`: below every
scored candidate, above failed ones, tied with the other unscored ones. A duplicate mask that
was verified once (`duplicate_of`) inherits the score of the candidate it duplicates.

Selectors here score the whole pool, which is what the single answer (`select`) and every
selector but one need. `consensus` depends on which candidates are drawn: its scores here are
pool-level (mean IoU with the other working candidates of all M, computed by the pipeline), and
`rescue.evaluation` scores it within each N-subset instead (`rescue/consensus.py`), so that
consensus@N sees only N candidates.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np

from rescue.records import CandidateRecord

UNSCORED = float(np.finfo(float).min)
"""Score of a working candidate without the selector's score: last among the working ones."""

Selector = Callable[..., np.ndarray]
"""(candidates, *, key: str, seed: int) -> float scores, one per candidate, in pool order."""


def _field_scores(candidates: Sequence[CandidateRecord], field: str) -> np.ndarray:
    by_index: dict[int, CandidateRecord] | None = None
    out = np.empty(len(candidates))
    for k, c in enumerate(candidates):
        if not c.ok:
            out[k] = -np.inf
            continue
        value = getattr(c, field)
        if value is None and c.duplicate_of is not None:
            if by_index is None:
                by_index = {c.index: c for c in candidates}
            if c.duplicate_of in by_index:
                value = getattr(by_index[c.duplicate_of], field)
        out[k] = UNSCORED if value is None or not math.isfinite(value) else float(value)
    return out


def verifier(candidates: Sequence[CandidateRecord], *, key: str = "", seed: int = 0) -> np.ndarray:
    """The verifier VLM's score of each candidate mask."""
    return _field_scores(candidates, "verifier_score")


def executor(candidates: Sequence[CandidateRecord], *, key: str = "", seed: int = 0) -> np.ndarray:
    """The executor's own confidence (SAM3's mask score)."""
    return _field_scores(candidates, "executor_score")


def consensus(candidates: Sequence[CandidateRecord], *, key: str = "", seed: int = 0) -> np.ndarray:
    """Mask consensus over the whole pool: mean IoU with the other working candidates.

    A lone working candidate (no other to agree with) has consensus None → 0.0, not UNSCORED.
    """
    s = _field_scores(candidates, "consensus")
    s[s == UNSCORED] = 0.0
    return s


def first(candidates: Sequence[CandidateRecord], *, key: str = "", seed: int = 0) -> np.ndarray:
    """The lowest hypothesis index wins: no selection, what a budget of one would give."""
    return np.array([-float(c.index) if c.ok else -np.inf for c in candidates])


def random(candidates: Sequence[CandidateRecord], *, key: str = "", seed: int = 0) -> np.ndarray:
    """A uniformly random working candidate, in exact expectation: every working candidate ties.

    Ties share their probability evenly in the estimators, so random@N is the pool's mean IoU at
    every N with no sampling noise. The single answer (`select`) draws a seeded permutation.
    """
    return np.array([0.0 if c.ok else -np.inf for c in candidates])


def _permutation(n: int, key: str, seed: int) -> np.ndarray:
    """A permutation fixed by (seed, key); `key` is the sample id, so record order is irrelevant."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(n)


def oracle(candidates: Sequence[CandidateRecord], *, key: str = "", seed: int = 0) -> np.ndarray:
    """True IoU with the ground truth: the upper bound of any selector."""
    return np.array([float(c.iou) if c.ok else -np.inf for c in candidates])


SELECTORS: dict[str, Selector] = {
    "verifier": verifier,
    "executor": executor,
    "consensus": consensus,
    "first": first,
    "random": random,
    "oracle": oracle,
}


def get(name: str) -> Selector:
    try:
        return SELECTORS[name]
    except KeyError:
        raise ValueError(
            f"unknown selector {name!r}; valid selectors: {', '.join(SELECTORS)}"
        ) from None


def scores(
    name: str, candidates: Sequence[CandidateRecord], *, key: str = "", seed: int = 0
) -> np.ndarray:
    """Scores of `candidates` under the selector called `name`."""
    return get(name)(candidates, key=key, seed=seed)


def select(
    name: str, candidates: Sequence[CandidateRecord], *, key: str = "", seed: int = 0
) -> int | None:
    """Position in `candidates` of the selector's pick over the whole pool (the single answer).

    Ties go to the earliest candidate, so the answer is deterministic. None when the pool is
    empty or every candidate failed.
    """
    if not candidates:
        return None
    s = scores(name, candidates, key=key, seed=seed)
    if name == "random":  # break the all-way tie by a seeded draw, not by position
        s = np.where(np.isfinite(s), _permutation(len(candidates), key, seed).astype(float), s)
    best = int(np.argmax(np.where(np.isnan(s), -np.inf, s)))
    return best if candidates[best].ok else None
