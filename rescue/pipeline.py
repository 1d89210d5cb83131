"""plan → execute → verify for every sample, through the cache, with bounded concurrency.

The pipeline owns the cache keys (what a model's answer depends on), the dedupe rules and the
one way a model is called (`Pipeline._cached`): identical prompts are executed once and
identical masks verified once per sample, while every hypothesis index keeps its own candidate
record, duplicates included, so best-of-N is unbiased. Scoring what came back is
`rescue.scoring`'s; each distinct mask is kept by digest (`rescue.mask_store`).

A model's answer, even a malformed one, is cached (asking again with the same seed gives the
same answer), and so is a permanent refusal (a 4xx: `failures.classify`); a `TransportError`
that survived the client's retries is recorded on the candidate and not cached, so a resumed run
retries exactly what failed. Any other exception from a client is a defect: the sample is
recorded `sample:crashed`. One failure never stops a run; a stage that fails for most of its
first calls does (`failures.StageGuard`), with one line naming the cause.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import orjson

from rescue import arena, cost, listwise, records, scoring
from rescue.cache import Cache, CacheMiss, Canonical, make_key
from rescue.cost import Cost
from rescue.datasets.base import Dataset, SampleError
from rescue.failures import CallFailure, RunAborted, StageGuard, TransportError, classify
from rescue.hypothesis import Hypothesis, Prompt, contiguous_runs
from rescue.mask_store import MaskStore
from rescue.priority import set_rank
from rescue.progress import StageBars
from rescue.protocols import Executor, Planner, Segmentation, Verdict, Verifier
from rescue.records import SampleRecord
from rescue.sample import Sample
from rescue.scoring import SampleMasks
from rescue.truth import SampleTruth

log = logging.getLogger(__name__)

T = TypeVar("T", bound=Hashable)
V = TypeVar("V")


@dataclass
class CallStats:
    """What the run asked of each model, and what the cache and dedupe saved.

    `requests` counts calls into a model client (one plan call may carry n hypotheses, one
    execute call all prompts of an image); `items` counts the hypotheses, prompts and masks
    computed by a model; `cached` those served from the cache; `deduped` those skipped because
    an identical prompt or mask of the same sample was already handled; `failures` those that
    failed, as the stage guard counted them (one count: `StageGuard.failures`). `cost` totals
    per stage what the answers this run rests on cost (each cache entry once: a sum over the
    entries read or written), `spent` what this run's own calls cost (`rescue.cost`).
    """

    guard: StageGuard = field(default_factory=StageGuard)
    requests: Counter[str] = field(default_factory=Counter)
    items: Counter[str] = field(default_factory=Counter)
    cached: Counter[str] = field(default_factory=Counter)
    deduped: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    failed_samples: int = 0
    cost: dict[str, Cost] = field(default_factory=dict)
    spent: dict[str, Cost] = field(default_factory=dict)

    def add_cost(self, stage: str, answers: Iterable[Any], *, spent: bool) -> None:
        added = cost.total([Cost.of(getattr(a, "meta", None)) for a in answers])
        for totals in (self.cost, self.spent) if spent else (self.cost,):
            totals[stage] = totals.get(stage, Cost()) + added

    @property
    def failures(self) -> Counter[str]:
        return self.guard.failures

    @property
    def model_calls(self) -> int:
        return sum(self.requests.values())

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "failed_samples": self.failed_samples,
                "model_calls": self.model_calls,
                **{name: dict(getattr(self, name)) for name in
                   ("requests", "items", "cached", "deduped", "failures")},
                "cost": {s: c.to_json() for s, c in sorted(self.cost.items())},
                "cost_spent": {s: c.to_json() for s, c in sorted(self.spent.items())}}


@dataclass(frozen=True)
class CachedCall(Generic[T, V]):
    """How one stage's items go through the cache and the model (`Pipeline._cached`).

    `key`, `what` and `label` name an item's cache entry, its `CacheMiss` and its entry's
    description; `load`/`dump` convert an answer from and to its cached JSON; `call` asks the
    model for a batch (answers in order); `failed` is the answer recorded for an item whose call
    failed; `batches` cuts the missing items into calls; `answers` names the item a partial
    result answers (`TransportError.partial`); `salvage` replaces an answer that does not
    survive storing.
    """

    stage: str
    key: Callable[[T], str]
    what: Callable[[T], str]
    label: Callable[[T], str]
    load: Callable[[Any], V]
    dump: Callable[[V], Any]
    call: Callable[[list[T]], Awaitable[list[V]]]
    failed: Callable[[T, CallFailure], V]
    batches: Callable[[list[T]], list[list[T]]] = lambda items: [items]
    answers: Callable[[V], T] | None = None
    salvage: Callable[[V, Exception], V] | None = None


def _plain(obj: Any) -> Any:
    return obj.tolist() if isinstance(obj, np.generic | np.ndarray) else str(obj)


_ORJSON_OPTS = (orjson.OPT_PASSTHROUGH_DATACLASS
                | orjson.OPT_PASSTHROUGH_DATETIME)


def _storable(value: Any) -> Any:
    """A model's answer as the cache stores it, standard JSON (numpy numbers plain, NaN and inf
    null), so a fresh run continues from exactly what a resumed one reads back. orjson does it
    in one pass (it writes NaN and inf as null); what it refuses (a lone surrogate in a
    model's text, an integer past 64 bits, a key that is not a string) takes the standard
    library's way (the one difference left: an Enum is stored as its value, not its str)."""
    try:
        return orjson.loads(orjson.dumps(value, default=_plain, option=_ORJSON_OPTS))
    except orjson.JSONEncodeError:
        return records.json_safe(json.loads(json.dumps(value, default=_plain)))


def _storable_all(values: list[Any]) -> list[Any]:
    """`_storable` of each value, in one orjson pass for the answers of one request; where
    orjson refuses one of them, each takes its own way (the result does not depend on which
    answers share a request)."""
    try:
        return orjson.loads(orjson.dumps(values, default=_plain, option=_ORJSON_OPTS))
    except orjson.JSONEncodeError:
        return [_storable(v) for v in values]


class Pipeline:
    """Runs the three stages for a set of samples and returns one `SampleRecord` each."""

    def __init__(self, planner: Planner, executor: Executor, verifier: Verifier, cache: Cache, *,
                 max_n: int, samples_in_flight: int = 8, progress: bool = True,
                 guard: StageGuard | None = None, plan: listwise.Plan | None = None) -> None:
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        self.planner, self.executor, self.verifier = planner, executor, verifier
        self.plan = plan  # what the evaluation draws: the listwise stage's sets
        self.cache = cache
        self.max_n = max_n
        self.samples_in_flight = samples_in_flight
        self.progress = progress
        self.stats = CallStats(guard=guard or StageGuard())
        self.masks = MaskStore(cache)  # every distinct mask, by digest
        self.truths: dict[str, SampleTruth] = {}  # per sample, for the run's masks.jsonl
        self._bars = StageBars(enabled=False, samples=0)  # `run` replaces it
        self._ids = {"planner": dict(planner.identity()), "executor": dict(executor.identity()),
                     "verifier": dict(verifier.identity())}
        self._id_json = {role: Canonical.of(ident) for role, ident in self._ids.items()}

    @property
    def guard(self) -> StageGuard:
        return self.stats.guard

    @property
    def identities(self) -> dict[str, dict[str, Any]]:
        """Each model's identity, as hashed into the cache keys (written to stats.json)."""
        return {role: dict(ident) for role, ident in self._ids.items()}

    @property
    def simulated(self) -> bool:
        return bool(self.planner.simulated or self.executor.simulated or self.verifier.simulated)

    # -- cache keys: everything that can change an answer ------------------------------------
    def _key(self, role: str, model: Any, sample: Sample, **fields: Any) -> str:
        base = {"role": role, "model": self._id_json[role], "image": sample.image_sha256,
                **fields}
        if model.simulated:  # a simulator reads the truth: the truth is an input
            base["truth"] = sample.truth_sha256
        return make_key(base)

    def plan_key(self, sample: Sample, index: int) -> str:
        return self._key("planner", self.planner, sample, query=sample.query, index=index)

    def execute_key(self, sample: Sample, prompt: Prompt) -> str:
        return self._key("executor", self.executor, sample,
                         prompt=Canonical(prompt.canonical_json))

    def verify_key(self, sample: Sample, mask_digest: str) -> str:
        return self._key("verifier", self.verifier, sample, query=sample.query, mask=mask_digest)

    def compare_key(self, sample: Sample, first: str, second: str) -> str:
        return self._key("verifier", self.verifier, sample, query=sample.query, first=first,
                         second=second)

    @property
    def verifier_shape(self) -> str:
        """How the verifier is asked: "pointwise" (one mask a call, the default), "pairwise"
        (two masks a call, `rescue.arena`) or "listwise" (the top-k masks of a subset in one
        call, `rescue.listwise`)."""
        return str(getattr(self.verifier, "call_shape", "pointwise"))

    # -- one cached call, for every stage ----------------------------------------------------
    async def _cached(self, spec: CachedCall[T, V], items: Sequence[T]) -> list[V]:
        """`spec`'s answer for each of `items` (distinct): cached ones read back, the missing
        ones asked of the model in `spec.batches`, concurrently."""
        stage = spec.stage
        keys = {item: spec.key(item) for item in items}  # each hashed once, read and stored
        if len(keys) == len(items):  # unless equal items have two keys (a prompt's -0.0 and 0.0)
            spec = replace(spec, key=keys.__getitem__)
        got: dict[T, V] = {}
        missing: list[T] = []
        for item in items:
            hit = self.cache.require(stage, spec.key(item), spec.what(item))
            if hit is None:
                missing.append(item)
            else:
                got[item] = spec.load(hit)
        self.stats.cached[stage] += len(got)
        self.stats.add_cost(stage, got.values(), spent=False)
        self._bars.update(stage, len(got))
        batches = spec.batches(missing) if missing else []
        for answered in await asyncio.gather(*(self._call(spec, b) for b in batches)):
            got.update(answered)
        return [got[item] for item in items]

    async def _call(self, spec: CachedCall[T, V], batch: list[T]) -> dict[T, V]:
        """One model call for `batch`. Its answers are cached, and so is a permanent refusal; a
        `TransportError` keeps what did arrive and records the rest as failed, uncached when it
        is transient. Any other exception is a defect and propagates (`sample:crashed`)."""
        stage = spec.stage
        self.stats.requests[stage] += 1
        try:
            answers = await spec.call(batch)
        except TransportError as exc:
            failure = classify(exc)
            wanted = set(batch)
            arrived: dict[T, V] = {}
            if spec.answers is not None:
                for v in exc.partial:
                    if spec.answers(v) in wanted:
                        arrived[spec.answers(v)] = v
            out = self._store(spec, arrived.items())
            self.stats.items[stage] += len(out)
            failed = {item: spec.failed(item, failure) for item in batch if item not in out}
            out.update(failed if failure.transient else self._store(spec, failed.items()))
            self.guard.record(stage, None, len(arrived))
            self.guard.record(stage, failure.error, len(failed))
        else:
            out = self._store(spec, zip(batch, answers, strict=True))
            self.stats.items[stage] += len(out)
            self.guard.record(stage, None, len(batch))
        self._bars.update(stage, len(batch))
        return out

    def _store(self, spec: CachedCall[T, V], answers: Iterable[tuple[T, V]]) -> dict[T, V]:
        """Cache the answers of one request together (`Cache.put_many`: a kill keeps all or
        none of them) and return each as read back from the cache, so a fresh run and a
        resumed one continue from the same bits."""
        pairs = list(answers)
        if not pairs:
            return {}
        self.stats.add_cost(spec.stage, [v for _, v in pairs], spent=True)
        items: list[T] = []
        values: list[Any] = []
        loaded: list[V] = []
        for (item, v), value in zip(pairs, _storable_all([spec.dump(v) for _, v in pairs]),
                                    strict=True):
            try:
                back = spec.load(value)
            except (TypeError, ValueError) as exc:  # e.g. a NaN coordinate, stored as null
                if spec.salvage is None:
                    raise
                value = spec.dump(spec.salvage(v, exc))
                back = spec.load(value)
            items.append(item)
            values.append(value)
            loaded.append(back)
        won = self.cache.put_many(spec.stage, [(spec.key(item), value, spec.label(item))
                                               for item, value in zip(items, values, strict=True)])
        # another job stored a key first: go on with its answer, the one every reader of the
        # cache is served, so this run's records describe what the cache holds
        return {item: back if w is value else spec.load(w)
                for item, value, back, w in zip(items, values, loaded, won, strict=True)}

    # -- the three stages ---------------------------------------------------------------------
    def _plans(self, sample: Sample) -> CachedCall[int, Hypothesis]:
        sid = sample.sample_id

        async def call(run: list[int]) -> list[Hypothesis]:
            hyps = await self.planner.plan(sample, run)
            if [h.index for h in hyps] != run:  # a client's defect, not a failed request
                raise RuntimeError(f"planner returned indices {[h.index for h in hyps]}, "
                                   f"asked for {run}")
            return hyps

        return CachedCall(
            stage="plan", key=lambda i: self.plan_key(sample, i),
            what=lambda i: f"hypothesis {i} of sample {sid!r}", label=lambda i: f"{sid}#{i}",
            load=Hypothesis.from_json, dump=Hypothesis.to_json, call=call,
            failed=lambda i, f: Hypothesis.invalid(i, "", f.error, transient=f.transient),
            batches=lambda idx: [list(range(start, start + count))
                                 for start, count in contiguous_runs(idx, len(idx))],
            answers=lambda h: h.index,
            salvage=lambda h, exc: Hypothesis.invalid(h.index, h.raw, f"plan:bad_value {exc}"))

    def _executions(self, sample: Sample) -> CachedCall[Prompt, Segmentation]:
        sid = sample.sample_id

        async def call(prompts: list[Prompt]) -> list[Segmentation]:
            segs = await self.executor.segment(sample, prompts)
            if len(segs) != len(prompts):
                raise RuntimeError(f"executor returned {len(segs)} results for "
                                   f"{len(prompts)} prompts")
            return segs

        return CachedCall(
            stage="execute", key=lambda p: self.execute_key(sample, p),
            what=lambda p: f"mask for prompt {p.to_json()} of sample {sid!r}",
            label=lambda p: f"{sid} {p.key}", load=Segmentation.from_json,
            dump=Segmentation.to_json, call=call,
            failed=lambda p, f: Segmentation(rle=None, error=f.error,
                                             meta={"transient": f.transient}))

    @staticmethod
    def _one_verdict_a_call(stage: str, key: Callable[[T], str], what: Callable[[T], str],
                            label: Callable[[T], str],
                            ask: Callable[[T], Awaitable[Verdict]]) -> CachedCall[T, Verdict]:
        """A verifier stage (verify, compare, choose): one item per call, answered by a
        `Verdict`; a failed call is recorded as a Verdict without a score."""

        async def call(items: list[T]) -> list[Verdict]:
            return [await ask(item) for item in items]

        return CachedCall(
            stage=stage, key=key, what=what, label=label, load=Verdict.from_json,
            dump=Verdict.to_json, call=call, batches=lambda items: [[i] for i in items],
            failed=lambda item, f: Verdict(score=None, error=f.error,
                                           meta={"transient": f.transient}))

    def _verdicts(self, sample: Sample, found: SampleMasks) -> CachedCall[str, Verdict]:
        sid = sample.sample_id
        return self._one_verdict_a_call(
            "verify", lambda d: self.verify_key(sample, d),
            lambda d: f"verdict on mask {d} of sample {sid!r}", lambda d: f"{sid} {d}",
            lambda d: self.verifier.verify(sample, found.decoded[d]))

    def _comparisons(self, sample: Sample,
                     found: SampleMasks) -> CachedCall[tuple[str, str], Verdict]:
        sid = sample.sample_id
        return self._one_verdict_a_call(
            "compare", lambda ab: self.compare_key(sample, *ab),
            lambda ab: f"comparison of masks {ab[0]} and {ab[1]} of sample {sid!r}",
            lambda ab: f"{sid} {ab[0]}>{ab[1]}",
            lambda ab: self.verifier.compare(sample, found.decoded[ab[0]],
                                             found.decoded[ab[1]]))

    async def _arena(self, sample: Sample, found: SampleMasks, rec: SampleRecord) -> None:
        """Both orders of every pair of distinct masks but near-duplicates (`rescue.arena`),
        answered into `rec.comparisons`."""
        pairs = arena.pairs_to_compare(np.asarray(rec.mask_iou, float).reshape(
            len(rec.masks), len(rec.masks)))
        items = [(rec.masks[i], rec.masks[j]) for i, j in pairs]
        self._bars.grow("compare", len(items))
        answers = await self._cached(self._comparisons(sample, found), items)
        rec.comparisons = [[i, j, v.score if v.ok else None, Cost.of(v.meta).to_json()]
                           for (i, j), v in zip(pairs, answers, strict=True)]

    def choose_key(self, sample: Sample, shown: Sequence[str]) -> str:
        return self._key("verifier", self.verifier, sample, query=sample.query,
                         shown=list(shown))

    def _choices(self, sample: Sample, found: SampleMasks) -> CachedCall[tuple[str, ...], Verdict]:
        sid = sample.sample_id
        return self._one_verdict_a_call(
            "choose", lambda shown: self.choose_key(sample, shown),
            lambda shown: f"listwise choice among masks {list(shown)} of sample {sid!r}",
            lambda shown: f"{sid} {'|'.join(shown)}",
            lambda shown: self.verifier.choose(sample, [found.decoded[d] for d in shown]))

    async def _listwise(self, sample: Sample, found: SampleMasks, rec: SampleRecord) -> None:
        """One call per set of top-k masks the evaluation's subsets show (`rescue.listwise`),
        answered into `rec.choices`."""
        if self.plan is None:
            raise ValueError("a listwise verifier needs the evaluation's plan (n_grid, seed, "
                             "draws) to know which sets to ask")
        sets = listwise.sets_needed(rec, self.plan.n_grid, top_k=int(self.verifier.top_k),
                                    seed=self.plan.seed, draws=self.plan.draws)
        items = [tuple(rec.masks[p] for p in shown) for shown in sets]
        self._bars.grow("choose", len(items))
        answers = await self._cached(self._choices(sample, found), items)
        rec.choices = [[list(shown), shown[int(v.meta["choice"])] if v.ok else None,
                        Cost.of(v.meta).to_json()]
                       for shown, v in zip(sets, answers, strict=True)]

    # -- one sample ---------------------------------------------------------------------------
    async def process(self, sample: Sample) -> SampleRecord:
        hyps = await self._cached(self._plans(sample), range(self.max_n))
        valid = [h for h in hyps if h.valid]
        # the executor gets the canonical prompt: exactly what its cache key describes
        unique_prompts = {h.prompt.key: h.prompt.canonical() for h in valid
                          if h.prompt is not None}
        self.stats.deduped["execute"] += len(valid) - len(unique_prompts)
        self._bars.grow("execute", len(unique_prompts))
        segs = await self._cached(self._executions(sample), list(unique_prompts.values()))
        found = scoring.check_masks(sample, dict(zip(unique_prompts, segs, strict=True)))
        self.masks.put_many(found.rles)
        self.truths[sample.sample_id] = SampleTruth.of(sample, found.rles)
        with_mask = sum(1 for h in valid if h.prompt.key in found.digest_of)
        digests = list(found.decoded)
        verdicts: dict[str, Verdict] = {}
        if self.verifier_shape == "pointwise":
            self.stats.deduped["verify"] += with_mask - len(found.decoded)
            self._bars.grow("verify", len(found.decoded))
            verdicts = dict(zip(digests, await self._cached(self._verdicts(sample, found),
                                                            digests), strict=True))
        rec = scoring.score_sample(sample, hyps, found, verdicts, simulated=self.simulated)
        if self.verifier_shape == "pairwise":
            await self._arena(sample, found, rec)
        elif self.verifier_shape == "listwise":
            await self._listwise(sample, found, rec)
        return rec

    # -- many samples -------------------------------------------------------------------------
    async def run(self, dataset: Dataset, sample_ids: Sequence[str],
                  partial: Path | None = None,
                  on_record: Callable[[SampleRecord], None] | None = None) -> list[SampleRecord]:
        """Process `sample_ids`; each finished record is appended to `partial` (crash-safe)."""
        sem = asyncio.Semaphore(self.samples_in_flight)
        self._bars = StageBars(enabled=self.progress, samples=len(sample_ids))
        out: list[SampleRecord] = []

        async def one(rank: int, sid: str) -> None:
            set_rank(rank)  # this task's requests go before later samples' (own context)
            async with sem:
                try:
                    sample = await asyncio.to_thread(dataset.load, sid)
                except SampleError as exc:
                    rec = SampleRecord(sample_id=sid, dataset=dataset.name, query="", height=0,
                                       width=0, target_area=0, simulated=self.simulated,
                                       error=f"load:failed {exc}", tags=list(exc.tags))
                    self.stats.failed_samples += 1
                else:
                    try:
                        rec = await self.process(sample)
                    except (CacheMiss, RunAborted):
                        raise  # the run as a whole cannot be answered
                    except Exception as exc:  # a defect met by one sample: keep the others
                        log.exception("sample %s failed; the run goes on", sid)
                        rec = SampleRecord(sample_id=sid, dataset=dataset.name,
                                           query=sample.query, height=sample.height,
                                           width=sample.width,
                                           target_area=int(sample.target.sum()),
                                           simulated=self.simulated, tags=list(sample.tags),
                                           error=f"sample:crashed {type(exc).__name__}: {exc}")
                        self.stats.failed_samples += 1
                self.stats.samples += 1
                self._bars.sample_done()
                if partial is not None:
                    records.append(partial, rec)
                if on_record is not None:
                    on_record(rec)
                out.append(rec)

        try:
            await asyncio.gather(*(one(i, s) for i, s in enumerate(sample_ids)))
        finally:
            self._bars.close()
        return sorted(out, key=lambda r: r.sample_id)
