"""Selectors: what picks one candidate of a sample's pool, each one `Selector` defined here.

A selector scores the candidates of a pool; higher is preferred. Every selector gives failed
candidates (no mask: failed at plan or execute, `not c.ok`) -inf, so a working candidate always
wins over a failed one; among failed ones the tie is shared (they all count as an empty
prediction anyway). A working candidate that lacks the score a selector reads (its verification
failed, or an executor reports no confidence) gets `UNSCORED`: below every scored candidate,
above failed ones, tied with the other unscored ones. A duplicate mask that was verified once
(`duplicate_of`) inherits the score of the candidate it duplicates.

Most selectors score a candidate alone, so one score per candidate of the whole pool serves the
single answer (`Selector.select`) and every N. A selector whose scores depend on which
candidates are drawn (`consensus`: agreement with the others drawn) also says how it weighs the
candidates within subsets (`within`); `rescue.evaluation` uses that, so that consensus@N sees
only N candidates. A verification policy (`prefilter`, `early_exit`, `until_confident`:
`rescue.policies`) is a verifier selector that sends fewer masks to the verifier (`policy`);
the evaluation reads its pick and its verify cost from it. `SELECTORS` is built from the
definitions below: a new selector is one more definition there.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import numpy as np

from rescue import arena, listwise, policies
from rescue.consensus import Draws, SubsetConsensus, SubsetEstimate
from rescue.errors import ConfigError
from rescue.records import CandidateRecord, SampleRecord

UNSCORED = float(np.finfo(float).min)
"""Score of a working candidate without the selector's score: last among the working ones."""


class PoolScores(Protocol):
    """One float score per candidate, in pool order; `key` (the sample id) and `seed` fix any
    draw, so record order is irrelevant."""

    def __call__(self, candidates: Sequence[CandidateRecord], *, key: str,
                 seed: int) -> np.ndarray: ...


class SubsetWeights(Protocol):
    """A sample's selection weights (one per candidate, summing to 1) for a selector that scores
    within each subset drawn."""

    def best_of_n(self, n: int) -> np.ndarray:
        """P(each candidate is the pick of a uniformly random N-subset)."""

    def estimate(self, n: int, values: np.ndarray) -> SubsetEstimate:
        """`best_of_n` as the evaluation reads it: the weights, whether they are exact, and the
        Monte-Carlo covariance of `weights @ values.T` where they are not."""

    def prefix(self, n: int) -> np.ndarray:
        """The pick among the first N candidates."""

    # A class may also offer `batch(items)`, a static method giving a `SubsetBatch` of many
    # items at once (consensus scores its samples together); the evaluation uses it where
    # there is one.


class SubsetBatch(Protocol):
    """Many samples' `SubsetWeights` of one class: each method equals the items' own, stacked
    or listed in item order, and is faster."""

    def prefix(self, n: int) -> np.ndarray:
        """(B, M): `[item.prefix(n) for item in items]`."""

    def estimate(self, n: int, values: Sequence[np.ndarray]) -> list[SubsetEstimate]:
        """`[item.estimate(n, v) for item, v in zip(items, values)]`."""


class WithinSubsets(Protocol):
    """A record's `SubsetWeights`; None when the record lacks what that needs (the selector is
    then scored over the whole pool). `draws` sets any Monte-Carlo average."""

    def __call__(self, record: SampleRecord, seed: int, draws: Draws) -> SubsetWeights | None: ...


@dataclass(frozen=True)
class Selector:
    """One selection rule, and everything the evaluation, plots and inference need to know of it.

    `score`: the pool's scores. `within`: set when the scores depend on the subset drawn.
    `needs_truth`: it reads the ground truth (an upper bound, not a method: refused by
    inference, drawn dashed, never bold in tables). `tie_break`: a second score that orders the
    candidates tied at the top for the single answer (default: the earliest wins). `color`: its
    line in every plot (None: a colour no other line of the plot has, `plots.line_colors`).
    `of_record`: pool scores that need more of the record than its candidates (the arena's
    comparisons), for the single answer. `needs_verifier`: it reads the verifier's answers
    (what a study charges it).
    `verifier_calls`: how a selector that needs the verifier spends it, for its cost columns:
    "per_mask" (one verify call per distinct mask drawn), "pairwise" (one per ordered pair of
    distinct masks drawn), "listwise" (one per set of top-k shown) or "unmodelled" (its verify
    cost columns are NaN rather than a wrong number): `rescue.expected_cost.VERIFIER_CALLS`.
    `policy`: a verification policy (`rescue.policies`): which masks of the N drawn it verifies
    and its pick among them, per record; the evaluation reads both quality and verify cost
    from it (a record it cannot read is scored by `score`, at the plain verifier's cost).
    """

    name: str
    score: PoolScores
    within: WithinSubsets | None = None
    needs_truth: bool = False
    tie_break: PoolScores | None = None
    color: str | None = None
    of_record: Callable[[SampleRecord], np.ndarray] | None = None
    needs_verifier: bool = False
    verifier_calls: str = "per_mask"
    policy: policies.Policy | None = None

    def scores(self, candidates: Sequence[CandidateRecord], *, key: str = "",
               seed: int = 0) -> np.ndarray:
        return self.score(candidates, key=key, seed=seed)

    def select(self, candidates: Sequence[CandidateRecord], *, key: str = "",
               seed: int = 0) -> int | None:
        """Position in `candidates` of the pick over the whole pool (the single answer).

        Ties go to `tie_break`, then to the earliest candidate, so the answer is deterministic.
        None when the pool is empty or every candidate failed.
        """
        if not candidates:
            return None
        s = self.scores(candidates, key=key, seed=seed)
        s = np.where(np.isnan(s), -np.inf, s)
        if self.tie_break is not None:
            top = s == s.max()
            s = np.where(top, self.tie_break(candidates, key=key, seed=seed), -np.inf)
        best = int(np.argmax(s))
        return best if candidates[best].ok else None

    def answer(self, record: SampleRecord, seed: int = 0) -> int | None:
        """Hypothesis index of the record's single answer; None when nothing can be picked."""
        if self.of_record is not None and record.candidates:
            s = self.of_record(record)
            best = int(np.argmax(s))
            return record.candidates[best].index if np.isfinite(s[best]) else None
        pos = self.select(record.candidates, key=record.sample_id, seed=seed)
        return record.candidates[pos].index if pos is not None else None


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


def _verifier(candidates: Sequence[CandidateRecord], *, key: str, seed: int) -> np.ndarray:
    return _field_scores(candidates, "verifier_score")


def _executor(candidates: Sequence[CandidateRecord], *, key: str, seed: int) -> np.ndarray:
    return _field_scores(candidates, "executor_score")


def _consensus(candidates: Sequence[CandidateRecord], *, key: str, seed: int) -> np.ndarray:
    """Over the whole pool (the pipeline's mean IoU with the other working candidates); a lone
    working candidate (no other to agree with) has consensus None → 0.0, not UNSCORED."""
    s = _field_scores(candidates, "consensus")
    s[s == UNSCORED] = 0.0
    return s


def _first(candidates: Sequence[CandidateRecord], *, key: str, seed: int) -> np.ndarray:
    return np.array([-float(c.index) if c.ok else -np.inf for c in candidates])


def _tied(candidates: Sequence[CandidateRecord], *, key: str, seed: int) -> np.ndarray:
    return np.array([0.0 if c.ok else -np.inf for c in candidates])


def _permutation(candidates: Sequence[CandidateRecord], *, key: str, seed: int) -> np.ndarray:
    """A permutation fixed by (seed, key); `key` is the sample id, so record order is irrelevant."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.permutation(len(candidates)).astype(float)


def _from_record(candidates: Sequence[CandidateRecord], *, key: str, seed: int) -> np.ndarray:
    """Scored within subsets from the record's comparisons or choices (`within`); over a bare
    candidate list there are none: every working candidate ties."""
    return _tied(candidates, key=key, seed=seed)


def _oracle(candidates: Sequence[CandidateRecord], *, key: str, seed: int) -> np.ndarray:
    return np.array([float(c.iou) if c.ok else -np.inf for c in candidates])


VERIFIER = Selector("verifier", _verifier, color="#1f77b4", needs_verifier=True)
"""The verifier VLM's score of each candidate mask."""

EXECUTOR = Selector("executor", _executor, color="#ff7f0e")
"""The executor's own confidence (SAM3's mask score): it knows nothing of the query."""

CONSENSUS = Selector("consensus", _consensus, within=SubsetConsensus.of, color="#2ca02c")
"""Mask consensus: mean IoU with the other working candidates drawn (`rescue.consensus`)."""

FIRST = Selector("first", _first, color="#8c564b")
"""The lowest hypothesis index wins: no selection, what a budget of one would give."""

RANDOM = Selector("random", _tied, tie_break=_permutation, color="#7f7f7f")
"""A uniformly random working candidate of the N drawn, in exact expectation: every working
candidate ties, and ties share their probability evenly in the estimators (no sampling noise).
Failed candidates are never picked while a working one is drawn, so random@N is the pool's mean
IoU (failures counted as 0) only at N = 1, or when nothing failed; at N >= 2 it is the mean over
the working candidates of the subset. The single answer draws a seeded permutation."""

ORACLE = Selector("oracle", _oracle, needs_truth=True, color="#d62728")
"""True IoU with the ground truth: the upper bound of any selector."""

ARENA = Selector("arena", _from_record, within=arena.ArenaWeights.of, color="#aec7e8",
                 of_record=arena.pool_scores, needs_verifier=True, verifier_calls="pairwise")
"""A pairwise verifier's tournament (EVOL-SAM3): the Copeland winner of the masks drawn, from
the record's cached comparisons (`rescue.arena`); a run whose verifier is pairwise has them."""


def registry(*selectors: Selector) -> Mapping[str, Selector]:
    """Name -> definition, in the order given; a name defined twice is an error."""
    out: dict[str, Selector] = {}
    for s in selectors:
        if s.name in out:
            raise ValueError(f"selector {s.name!r} is defined twice")
        out[s.name] = s
    return MappingProxyType(out)


LISTWISE = Selector("listwise", _from_record, within=listwise.ListwiseWeights.of,
                    color="#98df8a", of_record=listwise.pool_scores, needs_verifier=True,
                    verifier_calls="listwise")
"""Set-of-Marks: the mask a listwise verifier names among the top-k of the masks drawn, from
the record's cached choices (`rescue.listwise`); a run whose verifier is listwise has them."""

def policy_selectors(params: policies.PolicyParams) -> tuple[Selector, ...]:
    """The verification policies with `params` (`selection.policy`), as verifier selectors:
    `prefilter` (verify the top k by consensus within the N drawn), `early_exit` (verify in
    index order until k agree at IoU >= tau), `until_confident` (until a score exceeds p)."""
    out = []
    for rule in params.rules():
        policy = policies.Policy(rule, _verifier)
        out.append(Selector(rule.name, _verifier, color=_POLICY_COLORS[rule.name],
                            of_record=policy.answer_scores, needs_verifier=True,
                            policy=policy))
    return tuple(out)


_POLICY_COLORS = {"prefilter": "#000080", "early_exit": "#f032e6", "until_confident": "#000000"}
"""The palette colours farthest (CIELAB) from every other definition's (`colors.distinct`)."""


POLICIES = policy_selectors(policies.PolicyParams())
"""The policies with their default parameters; opt-in (`selection.selectors`)."""

DEFAULTS = (VERIFIER, EXECUTOR, CONSENSUS, FIRST, RANDOM, ORACLE)
"""What a run evaluates unless `selection.selectors` says otherwise."""

SELECTORS = registry(*DEFAULTS, ARENA, LISTWISE, *POLICIES)


def get(name: str) -> Selector:
    try:
        return SELECTORS[name]
    except KeyError:
        raise ConfigError(
            f"unknown selector {name!r}; valid selectors: {', '.join(SELECTORS)}"
        ) from None


def named(names: Sequence[str],
          policy: policies.PolicyParams | None = None) -> tuple[Selector, ...]:
    """The definitions of `names`, in their order; the policies with `policy`'s parameters
    (None: their defaults)."""
    built = {s.name: s for s in policy_selectors(policy)} if policy is not None else {}
    return tuple(built.get(str(n)) or get(str(n)) for n in names)
