"""Test-only brute force of the verification policies (`rescue.policies`): each policy run on
one subset in plain Python, from the record itself, and its expectation by enumerating every
N-subset. The policies' order is hypothesis-index order within the subset, so the subsets are
all there is to enumerate.

Ties: consensus values closer than 1e-9 tie (the stored IoUs have 6 decimals, so distinct
means differ by far more); verifier scores tie when equal, and a tie at the top is shared.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

from rescue import selection
from rescue.cost import Cost
from rescue.records import SampleRecord

TOL = 1e-9


@dataclass
class Outcome:
    """One subset: P(each pool position is the pick) and the masks sent to the verifier."""

    pick: dict[int, float]
    verified: set[str]


class View:
    """What the brute force reads of a record."""

    def __init__(self, record: SampleRecord):
        self.cands = record.candidates
        self.scores = selection.VERIFIER.scores(record.candidates)
        where = {d: k for k, d in enumerate(record.masks)}
        self.where = where
        self.pair = record.mask_iou
        self.tokens = {c.mask_key: Cost.from_json(c.cost["verify"]).tokens
                       for c in record.candidates if "verify" in c.cost}

    def iou(self, i: int, j: int) -> float:
        a, b = self.cands[i], self.cands[j]
        return float(self.pair[self.where[a.mask_key]][self.where[b.mask_key]])

    def working(self, i: int) -> bool:
        return self.cands[i].ok

    def plain(self, among: list[int]) -> dict[int, float]:
        """The plain verifier's pick among `among`: the top score, ties shared."""
        best = max(self.scores[i] for i in among)
        top = [i for i in among if self.scores[i] == best]
        return {i: 1.0 / len(top) for i in top}

    def masks(self, among: list[int]) -> set[str]:
        return {self.cands[i].mask_key for i in among if self.cands[i].mask_key is not None}


def plain_verifier(v: View, subset: list[int]) -> Outcome:
    return Outcome(v.plain(subset), v.masks(subset))


def prefilter(v: View, subset: list[int], k: int) -> Outcome:
    work = [i for i in subset if v.working(i)]
    if not work:
        return Outcome(v.plain(subset), set())

    def cons(i: int) -> float:
        others = [j for j in work if j != i]
        return sum(v.iou(i, j) for j in others) / len(others) if others else 0.0

    first: dict[str, int] = {}
    for i in work:
        first.setdefault(v.cands[i].mask_key, i)

    def order(a: str, b: str) -> int:
        ca, cb = cons(first[a]), cons(first[b])
        if abs(ca - cb) > TOL:
            return -1 if ca > cb else 1
        return -1 if first[a] < first[b] else 1

    chosen = set(sorted(first, key=functools.cmp_to_key(order))[:k])
    allowed = [i for i in subset if not v.working(i) or v.cands[i].mask_key in chosen]
    return Outcome(v.plain(allowed), chosen)


def early_exit(v: View, subset: list[int], k: int, tau: float) -> Outcome:
    seen: list[int] = []
    verified: list[int] = []
    for i in sorted(subset):
        seen.append(i)
        if not v.working(i):
            continue
        verified.append(i)
        if any(sum(v.iou(c, j) >= tau for j in verified if j != c) >= k - 1 for c in verified):
            break
    return Outcome(v.plain(seen), v.masks(verified))


def until_confident(v: View, subset: list[int], p: float) -> Outcome:
    seen: list[int] = []
    for i in sorted(subset):
        seen.append(i)
        if v.working(i) and v.scores[i] > p:
            return Outcome({i: 1.0}, v.masks(seen))
    return Outcome(v.plain(subset), v.masks(subset))


@dataclass
class Expectation:
    """Over subsets: P(each pool position is the pick), E[masks verified], E[verify tokens]."""

    weights: np.ndarray
    masks: float
    tokens: float


def expectation(v: View, policy, subsets: list[tuple[int, ...]]) -> Expectation:
    w = np.zeros(len(v.cands))
    masks = tokens = 0.0
    for s in subsets:
        out = policy(v, list(s))
        for i, p in out.pick.items():
            w[i] += p
        masks += len(out.verified)
        tokens += sum(v.tokens.get(mk, 0) for mk in out.verified)
    d = len(subsets)
    return Expectation(w / d, masks / d, tokens / d)


def every_subset(m: int, n: int) -> list[tuple[int, ...]]:
    return list(itertools.combinations(range(m), n))
