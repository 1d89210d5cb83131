"""Aggregators: what makes one new mask out of the N candidates drawn, with no model call.

A selector (`rescue.selection`) picks one candidate of a pool; an aggregator outputs a mask
that may be none of them (a pixel-wise vote), so it is scored by decoding the pool's masks and
comparing what it made with the truth, both read from the run's `masks.jsonl`
(`rescue.truth`). One `Aggregator` definition each, built from `selection.aggregation` params:

- `vote_best`, `vote_majority` (StAR's majority vote over rollouts): a candidate with an empty
  mask votes for "no object"; when those votes reach `empty_share` of the working votes the
  answer is empty. The other masks are clustered greedily in hypothesis order: a mask joins the
  first cluster whose first mask has IoU >= `cluster_iou` with it, else it starts one. The
  largest cluster (the earliest on a tie) wins if it holds at least `min_share` of the votes,
  else the answer is empty. `vote_best` outputs its medoid (the member with the highest mean
  IoU with the other members, the earliest on a tie), `vote_majority` the pixels that at least
  `majority` of its members cover.
- `verifier_fusion`: a pixel is kept when the verifier-score-weighted share of the drawn masks
  covering it is at least `fusion_threshold` (unscored masks weigh 0; all unscored: unweighted).
- `agent_accept` (SAM 3 Agent's accept/reject): a mask is accepted when its verifier score is
  at least `accept_score`; in decreasing score, an accepted mask whose intersection over the
  smaller area with a kept one exceeds `max_iom` is dropped as a duplicate; the output is the
  union of the kept masks (empty when none is accepted).

Candidates without a mask (failed at plan or execute) abstain; if every drawn candidate failed,
the answer is empty, scored like a failed candidate. The pairwise IoUs are the record's stored
ones (`SampleRecord.mask_iou`), so clusters are the ones every other tool sees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from math import comb
from types import MappingProxyType
from typing import Any

import numpy as np

from rescue import masks
from rescue.consensus import subsets_of
from rescue.errors import ConfigError
from rescue.records import SampleRecord
from rescue.truth import SampleTruth


@dataclass(frozen=True)
class Pool:
    """One sample's pool as an aggregator reads it: `masks` (D, P) its distinct masks over
    pixel atoms P (the pixels that any mask covers outside the ignore region, grouped by which
    masks cover them and whether they are target: every rule here is pixel-wise, so an atom
    stands for its `weight` pixels), `target` (P,) which atoms are target pixels, `ious` (D, D)
    their stored IoU, `iom` (D, D) intersection over the smaller area, `areas` (D,) full
    areas; per candidate (M,) `cand` its distinct mask (-1: none) and `scores` its verifier
    score (NaN: none)."""

    masks: np.ndarray
    target: np.ndarray
    weight: np.ndarray
    target_area: int
    ious: np.ndarray
    iom: np.ndarray
    areas: np.ndarray
    cand: np.ndarray
    scores: np.ndarray

    @classmethod
    def of(cls, record: SampleRecord, truth: SampleTruth) -> Pool:
        digests = list(record.masks)
        missing = [d for d in digests if d not in truth.masks]
        if missing:
            raise ValueError(f"sample {record.sample_id!r}: masks.jsonl lacks masks {missing[:3]}")
        full = np.stack([masks.decode(truth.masks[d]).ravel() for d in digests]) if digests \
            else np.zeros((0, record.height * record.width), bool)
        covered = full.any(axis=0)
        keep = covered & ~truth.ignore_mask().ravel()
        areas = full.sum(axis=1)
        # pairwise intersections over whole masks (ignore pixels too), from their atoms
        cols, _, weight = atoms(full[:, covered], np.zeros(int(covered.sum()), bool))
        inter = (cols * weight.astype(np.float64)) @ cols.T.astype(np.float64)
        small = np.minimum.outer(areas, areas)
        iom = np.divide(inter, small, out=np.zeros_like(inter), where=small > 0)
        pos = {d: k for k, d in enumerate(digests)}
        cand = np.array([pos.get(c.mask_key, -1) if c.ok else -1 for c in record.candidates],
                        dtype=int)
        scores = np.array([c.verifier_score if c.verifier_score is not None else np.nan
                           for c in record.candidates], dtype=float)
        cols, target, weight = atoms(full[:, keep], truth.target_mask().ravel()[keep])
        return cls(cols, target, weight, int(record.target_area),
                   np.asarray(record.mask_iou, float).reshape(len(digests), len(digests)),
                   iom, areas, cand, scores)

    def counts(self, pred: np.ndarray) -> tuple[float, float, float]:
        """(I, U, IoU) of a predicted mask over the pool's pixels (IoU 1 when both empty)."""
        inter = float(self.weight[pred & self.target].sum())
        union = float(self.weight[pred].sum()) + self.target_area - inter
        return inter, union, (inter / union if union > 0 else 1.0)


def atoms(cols: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels (columns of `cols`, (D, P)) grouped by their column and target flag: the
    distinct columns, their target flags and how many pixels each stands for. A few hundred
    atoms replace a real image's 10^5 covered pixels, so a subset's vote costs little."""
    sig = np.vstack([cols, target[None]])
    if sig.shape[1] == 0:
        return cols, target, np.zeros(0, dtype=np.int64)
    if sig.shape[0] <= 63:
        key = (sig.T.astype(np.uint64) << np.arange(sig.shape[0], dtype=np.uint64)).sum(axis=1)
        _, first, weight = np.unique(key, return_index=True, return_counts=True)
    else:
        _, first, weight = np.unique(sig, axis=1, return_index=True, return_counts=True)
    return cols[:, first], target[first], weight.astype(np.int64)


Combine = Callable[[Pool, np.ndarray], np.ndarray]
"""(pool, drawn candidate positions in increasing order) -> the output mask (P,) bool."""


@dataclass(frozen=True)
class AggregationParams:
    """`selection.aggregation`: StAR's vote parameters, fusion's threshold, SAM 3 Agent's
    accept score and duplicate rule, and the Monte-Carlo draws per (sample, N)."""

    cluster_iou: float = 0.85
    empty_share: float = 0.5
    min_share: float = 0.2
    majority: float = 0.5
    fusion_threshold: float = 0.5
    accept_score: float = 0.5
    max_iom: float = 0.3
    draws: int = 256

    def __post_init__(self) -> None:
        for name in ("cluster_iou", "empty_share", "min_share", "majority", "fusion_threshold",
                     "accept_score", "max_iom"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"selection.aggregation.{name} must be in [0, 1], got {v}")
        if self.draws < 2:
            raise ConfigError(f"selection.aggregation.draws must be >= 2, got {self.draws}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> AggregationParams:
        d = dict(cfg or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown selection.aggregation keys {unknown}; valid: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**{k: (int(v) if k == "draws" else float(v)) for k, v in d.items()})


def _drawn(pool: Pool, members: np.ndarray) -> np.ndarray:
    d = pool.cand[members]
    return d[d >= 0]


def _empty(pool: Pool) -> np.ndarray:
    return np.zeros(pool.masks.shape[1], bool)


def clusters(pool: Pool, votes: np.ndarray, iou: float) -> list[list[int]]:
    """Greedy leader clustering of the (non-empty) distinct masks `votes`, in their order."""
    out: list[list[int]] = []
    for x in votes.tolist():
        for cl in out:
            if pool.ious[cl[0], x] >= iou:
                cl.append(x)
                break
        else:
            out.append([x])
    return out


def cluster_vote(pool: Pool, members: np.ndarray, p: AggregationParams, *,
                 output: str) -> np.ndarray:
    votes = _drawn(pool, members)
    if votes.size == 0:
        return _empty(pool)
    empty = pool.areas[votes] == 0
    if empty.sum() >= p.empty_share * votes.size:
        return _empty(pool)
    found = clusters(pool, votes[~empty], p.cluster_iou)
    best = max(found, key=len)  # the first of the largest
    if len(best) < p.min_share * votes.size:
        return _empty(pool)
    if output == "majority":
        return pool.masks[best].sum(axis=0) >= p.majority * len(best)
    sub = pool.ious[np.ix_(best, best)]
    agree = (sub.sum(axis=1) - np.diag(sub)) / max(len(best) - 1, 1)
    return pool.masks[best[int(np.argmax(agree))]].copy()


def verifier_fusion(pool: Pool, members: np.ndarray, p: AggregationParams) -> np.ndarray:
    drawn = members[pool.cand[members] >= 0]
    if drawn.size == 0:
        return _empty(pool)
    w = np.nan_to_num(np.clip(pool.scores[drawn], 0.0, None), nan=0.0)
    if w.sum() <= 0:
        w = np.ones(len(drawn))
    share = w @ pool.masks[pool.cand[drawn]].astype(float) / w.sum()
    return share >= p.fusion_threshold - 1e-12


def agent_accept(pool: Pool, members: np.ndarray, p: AggregationParams) -> np.ndarray:
    drawn = members[pool.cand[members] >= 0]
    s = pool.scores[drawn]
    ok = ~np.isnan(s) & (s >= p.accept_score) & (pool.areas[pool.cand[drawn]] > 0)
    order = drawn[ok][np.argsort(-s[ok], kind="stable")]
    kept: list[int] = []
    for d in pool.cand[order].tolist():
        if all(pool.iom[d, k] <= p.max_iom for k in kept):
            kept.append(d)
    return pool.masks[kept].any(axis=0) if kept else _empty(pool)


@dataclass(frozen=True)
class Aggregator:
    """One rule that outputs a mask from the candidates drawn. `color`: its line in plots;
    `needs_truth` is False (no aggregator reads the truth; plots and tables ask);
    `needs_verifier`: it reads the verifier's scores."""

    name: str
    combine: Combine
    color: str | None = None
    needs_truth: bool = False
    needs_verifier: bool = False
    params: AggregationParams = field(default_factory=AggregationParams)


def build(params: AggregationParams) -> Mapping[str, Aggregator]:
    """Every aggregator, with `params`: name -> definition."""
    defs = (
        Aggregator("vote_best", lambda pool, m: cluster_vote(pool, m, params, output="best"),
                   "#9467bd", params=params),
        Aggregator("vote_majority",
                   lambda pool, m: cluster_vote(pool, m, params, output="majority"),
                   "#e377c2", params=params),
        Aggregator("verifier_fusion", lambda pool, m: verifier_fusion(pool, m, params),
                   "#17becf", needs_verifier=True, params=params),
        Aggregator("agent_accept", lambda pool, m: agent_accept(pool, m, params),
                   "#bcbd22", needs_verifier=True, params=params),
    )
    return MappingProxyType({a.name: a for a in defs})


AGGREGATORS = build(AggregationParams())
"""The definitions with StAR's and SAM 3 Agent's published parameters."""


def named(names: Sequence[str], params: AggregationParams | None = None) -> tuple[Aggregator, ...]:
    defs = AGGREGATORS if params is None else build(params)
    bad = [n for n in names if n not in defs]
    if bad:
        raise ConfigError(f"unknown aggregators {bad}; valid aggregators: {', '.join(defs)}")
    return tuple(defs[str(n)] for n in names)


@dataclass(frozen=True)
class Estimate:
    """Expected (I, U, IoU) of the aggregate over the subsets, its Monte-Carlo covariance
    (zeros when every subset was enumerated) and whether it is exact."""

    values: np.ndarray
    cov: np.ndarray
    exact: bool


def _rng(seed: int, name: str, sample_id: str, n: int) -> np.random.Generator:
    digest = hashlib.sha256(f"aggregate|{seed}|{name}|{sample_id}|{n}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def estimate(agg: Aggregator, pool: Pool, n: int, *, estimator: str, seed: int,
             sample_id: str) -> Estimate:
    """`best_of_n`: over uniformly random N-subsets (every subset where there are at most
    `params.draws`, else that many seeded draws); `prefix`: the first N candidates."""
    m = len(pool.cand)
    if estimator == "prefix" or n >= m:
        subs = np.arange(min(n, m))[None]
    else:
        subs = np.sort(subsets_of(m, n, agg.params.draws, _rng(seed, agg.name, sample_id, n)),
                       axis=1)
    exact = subs.shape[0] == 1 or comb(m, n) <= agg.params.draws
    memo: dict[tuple[float, ...], tuple[float, float, float]] = {}
    scores = np.nan_to_num(pool.scores, nan=-1.0)
    vals = np.empty((subs.shape[0], 3))
    for k, s in enumerate(subs):  # subsets drawing the same masks and scores agree
        key = (*pool.cand[s].tolist(), *scores[s].tolist())
        if key not in memo:
            memo[key] = pool.counts(agg.combine(pool, s))
        vals[k] = memo[key]
    if exact:
        return Estimate(vals.mean(axis=0), np.zeros((3, 3)), True)
    return Estimate(vals.mean(axis=0), np.cov(vals.T, ddof=1) / len(vals), False)
