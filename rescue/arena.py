"""The pairwise arena (EVOL-SAM3's tournament between candidate masks), scored offline.

The verifier is shown two distinct masks of a sample and asked which one answers the query; each
pair is asked in both orders (A, B) and (B, A), so a position bias cancels, and each ordered
pair is cached on its own. A pair whose stored IoU exceeds `SKIP_IOU` is never sent: near-
duplicates are a tie. The record keeps every answer (`SampleRecord.comparisons`: distinct mask
positions i, j, p = P(the first shown is better), and the call's cost), so any subset's winner
is computed from what is cached, with no model.

Winner of a subset (Copeland): mask a's preference over b is the mean over the orders asked of
P(a better), a beats b when it exceeds 1/2; a mask's Copeland score is its wins minus its
losses against the other distinct masks drawn (a skipped, unanswered or even pair counts 0).
The highest score wins; a tie goes to the highest sum of preferences (Borda), then is shared
evenly (like every selector's tie in `rescue.estimators`). Candidates without a mask never win
while one with a mask is drawn; duplicates of one mask share its win.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import permutations
from math import comb

import numpy as np

from rescue.consensus import (
    TIE_TOLERANCE,
    Draws,
    SubsetEstimate,
    rows_estimate,
    subsets_of,
)
from rescue.records import SampleRecord

SKIP_IOU = 0.85
"""EVOL-SAM3 skips the comparison of two masks this similar (IoU above it): a tie."""


def pairs_to_compare(ious: np.ndarray, skip_iou: float = SKIP_IOU) -> list[tuple[int, int]]:
    """Ordered pairs (i, j), i != j, of distinct masks to send: both orders of every pair whose
    IoU is at most `skip_iou`."""
    return [(i, j) for i, j in permutations(range(len(ious)), 2) if ious[i, j] <= skip_iou]


def preferences(record: SampleRecord) -> np.ndarray:
    """(D, D) over the record's distinct masks: P(row mask better than column mask), averaged
    over the orders answered; NaN where no order was answered."""
    d = len(record.masks)
    total, count = np.zeros((d, d)), np.zeros((d, d))
    for i, j, p, *_ in record.comparisons:
        if p is None:
            continue
        total[i, j] += p
        count[i, j] += 1
        total[j, i] += 1.0 - p
        count[j, i] += 1
    return np.divide(total, count, out=np.full((d, d), np.nan), where=count > 0)


def candidate_matrices(record: SampleRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per candidate (M, M): win (+1) / loss (-1) / 0, the preference (0 where none), and the
    (M,) mask of candidates with a mask."""
    pref = preferences(record)
    pos = {d: k for k, d in enumerate(record.masks)}
    idx = np.array([pos.get(c.mask_key, -1) if c.ok else -1 for c in record.candidates])
    ok = idx >= 0
    m = len(idx)
    win, borda = np.zeros((m, m)), np.zeros((m, m))
    sub = pref[np.ix_(idx[ok], idx[ok])] if ok.any() else np.zeros((0, 0))
    known = ~np.isnan(sub)
    win[np.ix_(ok, ok)] = np.where(known, np.sign(np.where(known, sub, 0.5) - 0.5), 0.0)
    borda[np.ix_(ok, ok)] = np.where(known, sub, 0.0)
    return win, borda, ok


def pick_weights(win: np.ndarray, borda: np.ndarray, ok: np.ndarray,
                 subsets: np.ndarray) -> np.ndarray:
    """(D, M): row d is the Copeland winner of `subsets[d]` (module doc), ties shared."""
    m = len(ok)
    members = np.zeros((subsets.shape[0], m), bool)
    members[np.arange(subsets.shape[0])[:, None], subsets] = True
    voters = (members & ok).astype(float)
    # wins - losses, then Borda below one win: Borda sums stay under m, Copeland steps are 1
    score = (voters @ win.T) * m + voters @ borda.T
    score = np.where(members & ok, score, -np.inf)
    best = score.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(best), score >= best - TIE_TOLERANCE, members)
    return top / top.sum(axis=1, keepdims=True)


def _rng(seed: int, sample_id: str, n: int) -> np.random.Generator:
    digest = hashlib.sha256(f"arena|{seed}|{sample_id}|{n}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def pool_scores(record: SampleRecord) -> np.ndarray:
    """The whole pool's Copeland-then-Borda scores (the single answer); -inf without a mask."""
    win, borda, ok = candidate_matrices(record)
    okf = ok.astype(float)
    return np.where(ok, (win @ okf) * len(ok) + borda @ okf, -np.inf)


@dataclass(frozen=True)
class ArenaWeights:
    """One sample's arena winner within subsets (`rescue.selection.SubsetWeights`): every
    N-subset where there are at most `draws.pilot`, else that many seeded draws."""

    win: np.ndarray
    borda: np.ndarray
    ok: np.ndarray
    sample_id: str
    seed: int
    draws: Draws

    @classmethod
    def of(cls, record: SampleRecord, seed: int, draws: Draws) -> ArenaWeights | None:
        if not record.comparisons:
            return None
        return cls(*candidate_matrices(record), record.sample_id, seed, draws)

    def _subsets(self, n: int) -> np.ndarray:
        return subsets_of(len(self.ok), n, self.draws.pilot, _rng(self.seed, self.sample_id, n))

    def best_of_n(self, n: int) -> np.ndarray:
        return pick_weights(self.win, self.borda, self.ok, self._subsets(n)).mean(axis=0)

    def estimate(self, n: int, values: np.ndarray) -> SubsetEstimate:
        m = len(self.ok)
        rows = pick_weights(self.win, self.borda, self.ok, self._subsets(n))
        return rows_estimate(rows, values, exact=n >= m or comb(m, n) <= self.draws.pilot)

    def prefix(self, n: int) -> np.ndarray:
        return pick_weights(self.win, self.borda, self.ok,
                            np.arange(min(n, len(self.ok)))[None])[0]
