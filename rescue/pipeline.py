"""plan → execute → verify for every sample, through the cache, with bounded concurrency.

The pipeline owns the cache keys (what a model's answer depends on) and the dedupe rules:
identical prompts are executed once and identical masks verified once per sample, while every
hypothesis index keeps its own candidate record, duplicates included, so best-of-N is unbiased.

A model's answer, even a malformed one, is cached (asking again with the same seed gives the
same answer), and so is a permanent refusal (a 4xx: `failures.classify`); a transport failure
that survived the client's retries is recorded on the candidate and not cached, so a resumed run
retries exactly what failed. One failure never stops a run; a stage that fails for most of its
first calls does (`failures.StageGuard`), with one line naming the cause.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from rescue import consensus, masks, records
from rescue.cache import Cache, CacheMiss, make_key
from rescue.datasets.base import Dataset, SampleError
from rescue.failures import RunAborted, StageGuard, classify
from rescue.hypothesis import Hypothesis, Prompt, contiguous_runs
from rescue.metrics import iou, iou_counts
from rescue.progress import StageBars
from rescue.protocols import Executor, Planner, Segmentation, Verdict, Verifier
from rescue.records import CandidateRecord, SampleRecord
from rescue.sample import Sample

log = logging.getLogger(__name__)


@dataclass
class CallStats:
    """What the run asked of each model, and what the cache and dedupe saved.

    `requests` counts calls into a model client (one plan call may carry n hypotheses, one
    execute call all prompts of an image); `items` counts the hypotheses, prompts and masks
    computed by a model; `cached` those served from the cache; `deduped` those skipped because
    an identical prompt or mask of the same sample was already handled.
    """

    requests: Counter[str] = field(default_factory=Counter)
    items: Counter[str] = field(default_factory=Counter)
    cached: Counter[str] = field(default_factory=Counter)
    deduped: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    failed_samples: int = 0

    @property
    def model_calls(self) -> int:
        return sum(self.requests.values())

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "failed_samples": self.failed_samples,
                "model_calls": self.model_calls,
                **{name: dict(getattr(self, name)) for name in
                   ("requests", "items", "cached", "deduped", "failures")}}


def _plain(obj: Any) -> Any:
    return obj.tolist() if isinstance(obj, np.generic | np.ndarray) else str(obj)


def _storable(value: Any) -> Any:
    """A model's answer as the cache stores it, standard JSON (numpy numbers plain, NaN and inf
    null), so a fresh run continues from exactly what a resumed one reads back."""
    return records.json_safe(json.loads(json.dumps(value, default=_plain)))


class Pipeline:
    """Runs the three stages for a set of samples and returns one `SampleRecord` each."""

    def __init__(self, planner: Planner, executor: Executor, verifier: Verifier, cache: Cache, *,
                 max_n: int, samples_in_flight: int = 8, progress: bool = True,
                 guard: StageGuard | None = None) -> None:
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        self.planner, self.executor, self.verifier = planner, executor, verifier
        self.cache = cache
        self.max_n = max_n
        self.samples_in_flight = samples_in_flight
        self.progress = progress
        self.stats = CallStats()
        self.guard = guard or StageGuard()
        self._bars = StageBars(enabled=False, plan_total=0)  # `run` replaces it
        self._ids = {"planner": dict(planner.identity()), "executor": dict(executor.identity()),
                     "verifier": dict(verifier.identity())}

    @property
    def identities(self) -> dict[str, dict[str, Any]]:
        """Each model's identity, as hashed into the cache keys (written to stats.json)."""
        return {role: dict(ident) for role, ident in self._ids.items()}

    @property
    def simulated(self) -> bool:
        return bool(self.planner.simulated or self.executor.simulated or self.verifier.simulated)

    # -- cache keys: everything that can change an answer ------------------------------------
    def _key(self, role: str, model: Any, sample: Sample, **fields: Any) -> str:
        base = {"role": role, "model": self._ids[role], "image": sample.image_sha256, **fields}
        if model.simulated:  # a simulator reads the truth: the truth is an input
            base["truth"] = sample.truth_sha256
        return make_key(base)

    def plan_key(self, sample: Sample, index: int) -> str:
        return self._key("planner", self.planner, sample, query=sample.query, index=index)

    def execute_key(self, sample: Sample, prompt: Prompt) -> str:
        return self._key("executor", self.executor, sample, prompt=prompt.to_json())

    def verify_key(self, sample: Sample, mask_digest: str) -> str:
        return self._key("verifier", self.verifier, sample, query=sample.query, mask=mask_digest)

    # -- stages -------------------------------------------------------------------------------
    async def _plan(self, sample: Sample) -> list[Hypothesis]:
        found: dict[int, Hypothesis] = {}
        missing: list[int] = []
        for i in range(self.max_n):
            hit = self.cache.require("plan", self.plan_key(sample, i),
                                     f"hypothesis {i} of sample {sample.sample_id!r}")
            if hit is None:
                missing.append(i)
            else:
                found[i] = Hypothesis.from_json(hit)
        self.stats.cached["plan"] += len(found)
        self._bars.update("plan", len(found))
        for start, count in contiguous_runs(missing, max(len(missing), 1)):
            run = list(range(start, start + count))
            self.stats.requests["plan"] += 1
            try:
                hyps = await self.planner.plan(sample, run)
                if [h.index for h in hyps] != run:
                    raise RuntimeError(f"planner returned indices {[h.index for h in hyps]}, "
                                       f"asked for {run}")
            except Exception as exc:  # failed after retries: transient ones are not cached
                # a client may hand over the hypotheses that did arrive (EndpointError.partial)
                arrived = [h for h in getattr(exc, "partial", None) or [] if h.index in run]
                found.update(self._keep(sample, arrived))
                lost = [i for i in run if i not in found]
                self.stats.failures["plan"] += len(lost)
                failure = classify(exc)
                failed = [Hypothesis.invalid(i, "", failure.error, transient=failure.transient)
                          for i in lost]
                if failure.transient:
                    found.update((h.index, h) for h in failed)
                else:
                    found.update(self._keep(sample, failed))
                self.guard.record("plan", None, len(arrived))
                self.guard.record("plan", failure.error, len(lost))
            else:
                found.update(self._keep(sample, hyps))
                self.guard.record("plan", None, len(run))
            self._bars.update("plan", len(run))
        return [found[i] for i in range(self.max_n)]

    def _keep(self, sample: Sample, hyps: Sequence[Hypothesis]) -> dict[int, Hypothesis]:
        """Cache the planner's answers and return them as read back from the cache, so a fresh
        run and a resumed one continue from the same bits."""
        out = {}
        for h in hyps:
            value = _storable(h.to_json())
            try:
                Hypothesis.from_json(value)
            except (TypeError, ValueError) as exc:  # e.g. a NaN coordinate, stored as null
                value = Hypothesis.invalid(h.index, h.raw, f"plan:bad_value {exc}").to_json()
            self.cache.put("plan", self.plan_key(sample, h.index), value,
                           f"{sample.sample_id}#{h.index}")
            out[h.index] = Hypothesis.from_json(value)
        self.stats.items["plan"] += len(hyps)
        return out

    async def _execute(self, sample: Sample, prompts: Iterable[Prompt]) -> dict[str, Segmentation]:
        results: dict[str, Segmentation] = {}
        missing: list[Prompt] = []
        for p in prompts:
            what = f"mask for prompt {p.to_json()} of sample {sample.sample_id!r}"
            hit = self.cache.require("execute", self.execute_key(sample, p), what)
            if hit is None:
                missing.append(p)
            else:
                results[p.key] = Segmentation.from_json(hit)
        self.stats.cached["execute"] += len(results)
        self._bars.update("execute", len(results))
        if missing:
            self.stats.requests["execute"] += 1
            try:
                segs = await self.executor.segment(sample, missing)
                if len(segs) != len(missing):
                    raise RuntimeError(f"executor returned {len(segs)} results for "
                                       f"{len(missing)} prompts")
            except Exception as exc:
                self.stats.failures["execute"] += len(missing)
                failure = classify(exc)
                for p in missing:
                    seg = Segmentation(rle=None, error=failure.error,
                                       meta={"transient": failure.transient})
                    if not failure.transient:
                        value = _storable(seg.to_json())
                        self.cache.put("execute", self.execute_key(sample, p), value,
                                       f"{sample.sample_id} {p.key}")
                    results[p.key] = seg
                self._bars.update("execute", len(missing))
                self.guard.record("execute", failure.error, len(missing))
                return results
            else:
                for p, seg in zip(missing, segs, strict=True):
                    value = _storable(seg.to_json())
                    self.cache.put("execute", self.execute_key(sample, p), value,
                                   f"{sample.sample_id} {p.key}")
                    results[p.key] = Segmentation.from_json(value)
                self.stats.items["execute"] += len(missing)
            self._bars.update("execute", len(missing))
            self.guard.record("execute", None, len(missing))
        return results

    async def _verify_one(self, sample: Sample, digest: str, mask: np.ndarray) -> Verdict:
        key = self.verify_key(sample, digest)
        hit = self.cache.require("verify", key, f"verdict on mask {digest} of sample "
                                                f"{sample.sample_id!r}")
        if hit is not None:
            self.stats.cached["verify"] += 1
            self._bars.update("verify")
            return Verdict.from_json(hit)
        self.stats.requests["verify"] += 1
        try:
            verdict = await self.verifier.verify(sample, mask)
        except Exception as exc:
            self.stats.failures["verify"] += 1
            failure = classify(exc)
            verdict = Verdict(score=None, error=failure.error,
                              meta={"transient": failure.transient})
            if not failure.transient:
                self.cache.put("verify", key, _storable(verdict.to_json()),
                               f"{sample.sample_id} {digest}")
            self._bars.update("verify")
            self.guard.record("verify", failure.error)
            return verdict
        value = _storable(verdict.to_json())
        self.cache.put("verify", key, value, f"{sample.sample_id} {digest}")
        self.stats.items["verify"] += 1
        self._bars.update("verify")
        self.guard.record("verify", None)
        return Verdict.from_json(value)

    # -- one sample ---------------------------------------------------------------------------
    async def process(self, sample: Sample) -> SampleRecord:
        hyps = await self._plan(sample)
        valid = [h for h in hyps if h.valid]
        # the executor gets the canonical prompt: exactly what its cache key describes
        unique_prompts = {h.prompt.key: h.prompt.canonical() for h in valid
                          if h.prompt is not None}
        self.stats.deduped["execute"] += len(valid) - len(unique_prompts)
        self._bars.grow("execute", len(unique_prompts))
        segs = await self._execute(sample, unique_prompts.values())

        decoded: dict[str, np.ndarray] = {}  # mask digest -> mask
        rle_of: dict[str, masks.Rle] = {}
        digest_of: dict[str, str] = {}  # prompt key -> mask digest
        for pkey, seg in segs.items():
            if seg.ok and seg.rle is not None:
                try:  # the executor's answer is untrusted input
                    if not isinstance(seg.rle.get("counts"), str):
                        raise TypeError("counts is not a compressed RLE string")
                    d = masks.digest(seg.rle)
                    m = decoded[d] if d in decoded else masks.decode(seg.rle)
                except (AttributeError, KeyError, TypeError, ValueError) as exc:
                    segs[pkey] = Segmentation(
                        rle=None, error=f"execute:bad_rle {type(exc).__name__}: {exc}")
                    continue
                digest_of[pkey] = d
                if d not in decoded:
                    if m.shape != sample.gt.shape:
                        digest_of.pop(pkey)
                        segs[pkey] = Segmentation(rle=None, error=(
                            f"execute:bad_mask_shape {m.shape} != image {sample.gt.shape}"))
                        continue
                    decoded[d], rle_of[d] = m, seg.rle
        with_mask = sum(1 for h in valid if h.prompt.key in digest_of)
        self.stats.deduped["verify"] += with_mask - len(decoded)
        self._bars.grow("verify", len(decoded))
        verdict_list = await asyncio.gather(
            *(self._verify_one(sample, d, m) for d, m in decoded.items()))
        verdicts = dict(zip(decoded, verdict_list, strict=True))
        return self._record(sample, hyps, segs, digest_of, decoded, rle_of, verdicts)

    def _record(self, sample: Sample, hyps: Sequence[Hypothesis],
                segs: Mapping[str, Segmentation], digest_of: Mapping[str, str],
                decoded: Mapping[str, np.ndarray], rle_of: Mapping[str, masks.Rle],
                verdicts: Mapping[str, Verdict]) -> SampleRecord:
        target_area = int(sample.target.sum())
        counts = {d: iou_counts(m, sample.gt) for d, m in decoded.items()}
        order = list(dict.fromkeys(digest_of[h.prompt.key] for h in hyps
                                   if h.valid and h.prompt.key in digest_of))
        pair = _mask_iou([rle_of[d] for d in order])
        first_index: dict[str, int] = {}
        cands: list[CandidateRecord] = []
        for h in hyps:
            c = CandidateRecord(index=h.index, intersection=0, union=target_area,
                                iou=iou(0, target_area))
            if h.prompt is not None:
                pj = h.prompt.to_json()
                c.text, c.box = pj.get("text"), pj.get("box")
                c.points, c.point_labels = pj.get("points"), pj.get("point_labels")
                c.prompt_key = h.prompt.key
            if not h.valid:
                c.failed_stage, c.error = "plan", h.error or "plan:empty_prompt"
                cands.append(c)
                continue
            seg = segs[h.prompt.key]
            c.executor_score = seg.score
            d = digest_of.get(h.prompt.key)
            if d is None:
                c.failed_stage, c.error = "execute", seg.error or "execute:no_mask"
                cands.append(c)
                continue
            c.mask_key, c.area = d, int(decoded[d].sum())
            c.duplicate_of = first_index.setdefault(d, h.index)
            if c.duplicate_of == h.index:
                c.duplicate_of = None
            c.intersection, c.union = counts[d]
            c.iou = iou(*counts[d])
            v = verdicts[d]
            c.verifier_score, c.verifier_source = v.score, v.source or None
            if not v.ok:
                c.failed_stage, c.error = "verify", v.error or "verify:no_score"
            cands.append(c)
        rec = SampleRecord(sample_id=sample.sample_id, dataset=sample.dataset, query=sample.query,
                           height=sample.height, width=sample.width, target_area=target_area,
                           simulated=self.simulated, candidates=cands, tags=list(sample.tags),
                           masks=order, mask_iou=pair.tolist())
        pool = consensus.candidate_ious(rec)  # None when no candidate has a mask
        if pool is not None:
            for c, score in zip(cands, consensus.pool_scores(*pool), strict=True):
                if c.ok:
                    c.consensus = float(score)
        return rec

    # -- many samples -------------------------------------------------------------------------
    async def run(self, dataset: Dataset, sample_ids: Sequence[str],
                  partial: Path | None = None,
                  on_record: Callable[[SampleRecord], None] | None = None) -> list[SampleRecord]:
        """Process `sample_ids`; each finished record is appended to `partial` (crash-safe)."""
        sem = asyncio.Semaphore(self.samples_in_flight)
        self._bars = StageBars(enabled=self.progress, plan_total=len(sample_ids) * self.max_n)
        out: list[SampleRecord] = []

        async def one(sid: str) -> None:
            async with sem:
                try:
                    sample = await asyncio.to_thread(dataset.load, sid)
                except SampleError as exc:
                    rec = SampleRecord(sample_id=sid, dataset=dataset.name, query="", height=0,
                                       width=0, target_area=0, simulated=self.simulated,
                                       error=f"load:failed {exc}", tags=list(exc.tags))
                    self.stats.failed_samples += 1
                    self._bars.update("plan", self.max_n)
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
                if partial is not None:
                    records.append(partial, rec)
                if on_record is not None:
                    on_record(rec)
                out.append(rec)

        try:
            await asyncio.gather(*(one(s) for s in sample_ids))
        finally:
            self._bars.close()
        return sorted(out, key=lambda r: r.sample_id)

    def masks_of(self, sample: Sample, record: SampleRecord) -> dict[int, np.ndarray]:
        """Candidate masks of a record, read back from the execute cache (for overlays)."""
        out: dict[int, np.ndarray] = {}
        for c in record.candidates:
            if c.mask_key is None:
                continue
            prompt = Prompt.from_json({"text": c.text, "box": c.box, "points": c.points or [],
                                       "point_labels": c.point_labels or []})
            hit = self.cache.get("execute", self.execute_key(sample, prompt))
            if hit is not None and hit.get("rle") is not None:
                out[c.index] = masks.decode(hit["rle"])
        return out


def _mask_iou(rles: Sequence[masks.Rle]) -> np.ndarray:
    """Pairwise IoU of distinct masks (two empty masks agree perfectly, as LISA scores them),
    rounded to 6 decimals: what is stored is what every later computation reads."""
    if not rles:
        return np.zeros((0, 0))
    coco = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
    pair = np.asarray(mask_utils.iou(coco, coco, [0] * len(coco)), dtype=float).reshape(
        len(rles), len(rles))
    empty = np.array([masks.area(r) == 0 for r in rles])
    pair[np.ix_(empty, empty)] = 1.0
    return np.round(pair, 6)
