"""Listwise Set-of-Marks: one verifier call sees the top-k masks of a subset, numbered on one
image, and names the best; scored offline from the cached choices.

Which masks a call shows depends on the subset drawn: its distinct masks ranked by consensus
within the subset (`rescue.consensus`: mean IoU with the subset's other working candidates; ties
to the earlier mask), the first `top_k` of them, shown in the record's mask order so one set is
one call whatever the subset. A subset with one distinct mask needs no call. The subsets are
those the evaluation draws (every N-subset where there are at most `draws`, else `draws` seeded
ones, and the first N for the prefix estimator), so a run asks exactly the sets its evaluation
will read (`sets_needed`), and the record keeps each answer (`SampleRecord.choices`: the set's
mask positions, the position chosen, None when the call failed: the top-consensus mask then
stands in, and the call's cost, `rescue.expected_cost`). An evaluation whose grid or seed needs
a set that was never asked says so, naming it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from math import comb

import numpy as np

from rescue.consensus import (
    Draws,
    SubsetEstimate,
    candidate_ious,
    rows_estimate,
    scores_within,
    subsets_of,
)
from rescue.records import SampleRecord


def _rng(seed: int, sample_id: str, n: int) -> np.random.Generator:
    digest = hashlib.sha256(f"listwise|{seed}|{sample_id}|{n}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def subsets(m: int, n: int, *, seed: int, sample_id: str, draws: int) -> np.ndarray:
    """The best-of-N subsets the evaluation reads (the run asks their sets)."""
    return subsets_of(m, min(n, m), draws, _rng(seed, sample_id, min(n, m)))


@dataclass(frozen=True)
class Marks:
    """A record's pool as the listwise call sees it: candidate IoUs, working mask, and each
    candidate's distinct mask position (-1: none)."""

    ious: np.ndarray
    ok: np.ndarray
    pos: np.ndarray

    @classmethod
    def of(cls, record: SampleRecord) -> Marks | None:
        pool = candidate_ious(record)
        if pool is None:
            return None
        where = {d: k for k, d in enumerate(record.masks)}
        pos = np.array([where.get(c.mask_key, -1) if c.ok else -1 for c in record.candidates])
        return cls(pool[0], pool[1], pos)

    def shown(self, subset: Sequence[int], top_k: int) -> tuple[int, ...]:
        """The mask positions one call over `subset` shows (sorted; one mask: no call)."""
        members = np.zeros((1, len(self.ok)), bool)
        members[0, list(subset)] = True
        score = scores_within(self.ious, self.ok, members)[0]
        best: dict[int, float] = {}
        for k in subset:
            if self.pos[k] >= 0:
                best[int(self.pos[k])] = max(best.get(int(self.pos[k]), -np.inf), score[k])
        ranked = sorted(best, key=lambda p: (-best[p], p))
        return tuple(sorted(ranked[:top_k]))


def sets_needed(record: SampleRecord, n_grid: Iterable[int], *, top_k: int, seed: int,
                draws: int) -> list[tuple[int, ...]]:
    """Every set of two or more masks the evaluation of `record` at `n_grid` will look up."""
    marks = Marks.of(record)
    if marks is None:
        return []
    m = len(record.candidates)
    out: dict[tuple[int, ...], None] = {}
    for n in n_grid:
        subs = [*subsets(m, n, seed=seed, sample_id=record.sample_id, draws=draws),
                np.arange(min(n, m))]
        for s in subs:
            shown = marks.shown(s, top_k)
            if len(shown) > 1:
                out.setdefault(shown, None)
    return list(out)


class MissingChoice(ValueError):
    """An evaluation needs a listwise answer the run never asked."""


@dataclass(frozen=True)
class ListwiseWeights:
    """One sample's listwise pick within subsets (`rescue.selection.SubsetWeights`)."""

    marks: Marks
    chosen: dict[tuple[int, ...], int | None]
    top_k: int
    sample_id: str
    seed: int
    draws: Draws

    @classmethod
    def of(cls, record: SampleRecord, seed: int, draws: Draws) -> ListwiseWeights | None:
        marks = Marks.of(record)
        if not record.choices or marks is None:
            return None
        chosen = {tuple(int(p) for p in c[0]): c[1] for c in record.choices}
        top_k = max(len(s) for s in chosen)
        return cls(marks, chosen, top_k, record.sample_id, seed, draws)

    def pick(self, subset: Sequence[int]) -> np.ndarray:
        m = len(self.marks.ok)
        w = np.zeros(m)
        members = [k for k in subset if self.marks.pos[k] >= 0]
        if not members:
            w[list(subset)] = 1.0 / len(subset)
            return w
        shown = self.marks.shown(subset, self.top_k)
        if len(shown) == 1:
            mask = shown[0]
        else:
            if shown not in self.chosen:
                raise MissingChoice(
                    f"sample {self.sample_id!r}: no listwise answer for masks {list(shown)}; "
                    "rerun mode=run with the listwise verifier at this n_grid and seed (its "
                    "plan and masks come from the cache)")
            got = self.chosen[shown]  # None: the call failed, the top-consensus mask stands in
            mask = self.marks.shown(subset, 1)[0] if got is None else int(got)
        win = [k for k in members if self.marks.pos[k] == mask]
        w[win] = 1.0 / len(win)
        return w

    def _subsets(self, n: int) -> np.ndarray:
        return subsets(len(self.marks.ok), n, seed=self.seed, sample_id=self.sample_id,
                       draws=self.draws.pilot)

    def _rows(self, n: int) -> np.ndarray:
        return np.stack([self.pick(s) for s in self._subsets(n)])

    def shown_sets(self, n: int, estimator: str) -> tuple[list[tuple[int, ...]], bool]:
        """The set one call shows for each subset the estimator reads at N (() where the
        subset needs no call: fewer than two masks), and whether those are every subset."""
        m = len(self.marks.ok)
        if estimator == "prefix":
            subs, exact = np.arange(min(n, m))[None], True
        elif estimator == "best_of_n":
            subs, exact = self._subsets(n), n >= m or comb(m, n) <= self.draws.pilot
        else:
            raise ValueError(f"unknown estimator {estimator!r}")
        sets = [self.marks.shown(s, self.top_k) for s in subs]
        return [s if len(s) > 1 else () for s in sets], exact

    def best_of_n(self, n: int) -> np.ndarray:
        return self._rows(n).mean(axis=0)

    def estimate(self, n: int, values: np.ndarray) -> SubsetEstimate:
        m = len(self.marks.ok)
        return rows_estimate(self._rows(n), values,
                             exact=n >= m or comb(m, n) <= self.draws.pilot)

    def prefix(self, n: int) -> np.ndarray:
        return self.pick(list(range(min(n, len(self.marks.ok)))))


def pool_scores(record: SampleRecord) -> np.ndarray:
    """The single answer: the pick over the whole pool (1 for its candidates, else 0; -inf
    without a mask)."""
    ok = np.array([c.ok for c in record.candidates])
    w = ListwiseWeights.of(record, 0, Draws())
    if w is None:
        return np.where(ok, 0.0, -np.inf)
    return np.where(ok, w.pick(list(range(len(ok)))), -np.inf)


@dataclass(frozen=True)
class Plan:
    """What a run's evaluation will draw (`EvaluationSettings`: n_grid, seed, consensus_draws):
    the listwise stage asks exactly the sets it needs."""

    n_grid: tuple[int, ...]
    seed: int
    draws: int
