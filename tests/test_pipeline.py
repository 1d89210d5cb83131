"""The pipeline with tiny in-test models: dedupe, failure records, caching, growing max_n."""

import asyncio

import numpy as np
import pytest

from rescue import masks
from rescue.cache import Cache, CacheMiss
from rescue.datasets.base import SampleError
from rescue.failures import TransportError
from rescue.hypothesis import Hypothesis, Prompt
from rescue.mask_store import MaskStore
from rescue.pipeline import Pipeline
from rescue.protocols import Segmentation, Verdict
from rescue.records import dumps
from rescue.sample import Sample

BOXES = [(10, 10, 30, 30), (10, 10, 30, 30), (0, 0, 20, 20), (30, 30, 60, 60)]


class ListPlanner:
    """Index i proposes BOXES[i % 4]; every index ≡ 5 (mod 8) is malformed."""

    simulated = False

    def __init__(self):
        self.requests: list[list[int]] = []

    def identity(self):
        return {"name": "list-planner"}

    async def plan(self, sample, indices):
        self.requests.append(list(indices))
        out = []
        for i in indices:
            if i % 8 == 5:
                out.append(Hypothesis.invalid(i, "{bbox_2d: [", "parse:truncated"))
            else:
                out.append(Hypothesis(index=i, prompt=Prompt(text="thing", box=BOXES[i % 4])))
        return out


class BoxExecutor:
    simulated = False

    def __init__(self, fail_times=0):
        self.prompts: list[Prompt] = []
        self.fail_times = fail_times

    def identity(self):
        return {"backend": "box"}

    async def segment(self, sample, prompts):
        if self.fail_times:
            self.fail_times -= 1
            raise TransportError("executor down")
        self.prompts.extend(prompts)
        out = []
        for p in prompts:
            m = np.zeros(sample.gt.shape, bool)
            x1, y1, x2, y2 = (int(v) for v in p.box)
            m[y1:y2, x1:x2] = True
            out.append(Segmentation(rle=masks.encode(m), score=0.5, box=p.box))
        return out


class AreaVerifier:
    simulated = False

    def __init__(self):
        self.calls = 0

    def identity(self):
        return {"name": "area"}

    async def verify(self, sample, mask):
        self.calls += 1
        return Verdict(score=float(mask.mean()), source="parsed")


class OneSample:
    name = "one"

    def __init__(self, bad=()):
        self.bad = set(bad)

    def sample_ids(self):
        return ["a", "b"]

    def load(self, sid):
        if sid in self.bad:
            raise SampleError(f"{sid}: image is corrupt")
        img = np.full((64, 64, 3), 40 if sid == "a" else 90, np.uint8)
        gt = np.zeros((64, 64), np.uint8)
        gt[10:30, 10:30] = 1
        return Sample(sample_id=sid, query="the square", image=img, gt=gt, dataset="one")


def _run(tmp_path, planner, executor, verifier, max_n, offline=False, bad=()):
    cache = Cache(tmp_path / "cache", offline=offline)
    pipe = Pipeline(planner, executor, verifier, cache, max_n=max_n, progress=False)
    recs = asyncio.run(pipe.run(OneSample(bad), ["a", "b"]))
    return recs, pipe


def test_dedupe_and_per_candidate_records(tmp_path):
    p, e, v = ListPlanner(), BoxExecutor(), AreaVerifier()
    recs, pipe = _run(tmp_path, p, e, v, max_n=8)
    assert p.requests == [list(range(8))] * 2  # one request per sample, all indices
    assert len(e.prompts) == 2 * 3  # 3 distinct boxes per sample
    assert v.calls == 2 * 3
    r = recs[0]
    assert [c.index for c in r.candidates] == list(range(8))  # duplicates keep their index
    assert r.candidates[5].failed_stage == "plan" and r.candidates[5].error == "parse:truncated"
    assert r.candidates[0].iou == pytest.approx(1.0)
    assert r.candidates[1].duplicate_of == 0 and r.candidates[4].duplicate_of == 0
    assert (r.candidates[0].intersection, r.candidates[0].union) == (400, 400)
    assert r.candidates[2].intersection == 100 and r.candidates[2].union == 700
    # consensus: index 0 agrees perfectly with its two duplicates (1 and 4), partly with others
    assert 0 < r.candidates[0].consensus < 1
    assert pipe.stats.deduped["execute"] == 2 * 4 and pipe.stats.deduped["verify"] == 2 * 4
    assert pipe.stats.model_calls == 2 + 2 + 6


def test_growing_max_n_only_generates_new_indices(tmp_path):
    _run(tmp_path, ListPlanner(), BoxExecutor(), AreaVerifier(), max_n=4)
    p, e, v = ListPlanner(), BoxExecutor(), AreaVerifier()
    recs, _ = _run(tmp_path, p, e, v, max_n=8)
    assert p.requests == [[4, 5, 6, 7]] * 2
    assert e.prompts == [] and v.calls == 0  # indices 4..7 repeat boxes already segmented
    assert len(recs[0].candidates) == 8


def test_transient_failure_is_recorded_not_cached_and_retried(tmp_path):
    recs, pipe = _run(tmp_path, ListPlanner(), BoxExecutor(fail_times=2), AreaVerifier(), 8)
    failed = [c for r in recs for c in r.candidates if c.failed_stage == "execute"]
    assert len(failed) == 2 * 7 and all("executor down" in c.error for c in failed)
    assert pipe.stats.failures["execute"] == 6
    recs2, pipe2 = _run(tmp_path, ListPlanner(), BoxExecutor(), AreaVerifier(), 8)
    assert pipe2.stats.requests["plan"] == 0  # plans were cached
    assert pipe2.stats.requests["execute"] == 2
    assert not [c for r in recs2 for c in r.candidates if c.failed_stage == "execute"]


def test_offline_rerun_makes_no_call_and_equal_records(tmp_path):
    recs, _ = _run(tmp_path, ListPlanner(), BoxExecutor(), AreaVerifier(), 8)
    p, e, v = ListPlanner(), BoxExecutor(), AreaVerifier()
    recs2, pipe = _run(tmp_path, p, e, v, 8, offline=True)
    assert pipe.stats.model_calls == 0 and p.requests == [] and v.calls == 0
    assert [r.to_json() for r in recs] == [r.to_json() for r in recs2]


def test_offline_miss_is_an_error_naming_the_sample(tmp_path):
    with pytest.raises(CacheMiss, match="hypothesis 0 of sample 'a'"):
        _run(tmp_path, ListPlanner(), BoxExecutor(), AreaVerifier(), 2, offline=True)


def test_a_corrupt_sample_is_recorded_and_the_run_goes_on(tmp_path):
    recs, pipe = _run(tmp_path, ListPlanner(), BoxExecutor(), AreaVerifier(), 4, bad={"a"})
    assert recs[0].error == "load:failed a: image is corrupt" and recs[0].candidates == []
    assert len(recs[1].candidates) == 4 and pipe.stats.failed_samples == 1


class FinePlanner(ListPlanner):
    """Boxes with sub-pixel noise beyond the canonical 1/100 px."""

    async def plan(self, sample, indices):
        hyps = await super().plan(sample, indices)
        return [Hypothesis(index=h.index, prompt=Prompt(text="thing", box=tuple(
            v + 0.123456 for v in h.prompt.box))) if h.valid else h for h in hyps]


class CanonicalOnlyExecutor(BoxExecutor):
    async def segment(self, sample, prompts):
        assert all(p == p.canonical() for p in prompts), prompts
        return await super().segment(sample, prompts)


def test_fresh_and_resumed_runs_execute_the_same_bits(tmp_path):
    """A hypothesis read back from the cache and a fresh one must reach the executor equal."""
    clean, _ = _run(tmp_path / "clean", FinePlanner(), CanonicalOnlyExecutor(), AreaVerifier(), 8)
    _run(tmp_path / "resumed", FinePlanner(), CanonicalOnlyExecutor(fail_times=2),
         AreaVerifier(), 8)  # plans cached, executions failed
    resumed, _ = _run(tmp_path / "resumed", FinePlanner(), CanonicalOnlyExecutor(),
                      AreaVerifier(), 8)
    assert [r.to_json() for r in resumed] == [r.to_json() for r in clean]


class HalfPlanner(ListPlanner):
    """Delivers the first half of a request, then fails, like a client whose second chunk died."""

    async def plan(self, sample, indices):
        hyps = await super().plan(sample, indices)
        raise TransportError("second chunk lost", partial=hyps[: len(hyps) // 2])


def test_hypotheses_that_arrived_before_a_failure_are_kept(tmp_path):
    recs, pipe = _run(tmp_path, HalfPlanner(), BoxExecutor(), AreaVerifier(), 8)
    stages = [c.failed_stage for c in recs[0].candidates]
    assert stages[4:] == ["plan"] * 4 and "second chunk lost" in recs[0].candidates[7].error
    assert stages[:4] == [None, None, None, None]
    assert pipe.stats.failures["plan"] == 2 * 4
    p = ListPlanner()
    _run(tmp_path, p, BoxExecutor(), AreaVerifier(), 8)
    assert p.requests == [[4, 5, 6, 7]] * 2  # the resumed run asks only for what was lost


def test_process_one_sample_without_run(tmp_path):
    pipe = Pipeline(ListPlanner(), BoxExecutor(), AreaVerifier(), Cache(tmp_path), max_n=4,
                    progress=False)
    rec = asyncio.run(pipe.process(OneSample().load("a")))
    assert [c.index for c in rec.candidates] == [0, 1, 2, 3] and rec.candidates[0].iou == 1.0


def test_a_defect_in_one_sample_is_recorded_and_the_others_finish(tmp_path, monkeypatch):
    pipe = Pipeline(ListPlanner(), BoxExecutor(), AreaVerifier(), Cache(tmp_path), max_n=4,
                    progress=False)

    async def crash(sample):  # e.g. a bug past the per-stage guards
        raise KeyError("a defect only sample b meets")

    real = pipe.process
    monkeypatch.setattr(pipe, "process", lambda s: crash(s) if s.sample_id == "b" else real(s))
    recs = asyncio.run(pipe.run(OneSample(), ["a", "b"]))
    assert len(recs[0].candidates) == 4 and recs[0].error is None
    assert recs[1].error.startswith("sample:crashed KeyError") and recs[1].target_area == 400
    assert pipe.stats.failed_samples == 1


def test_an_offline_miss_still_stops_the_run(tmp_path):
    with pytest.raises(CacheMiss):
        _run(tmp_path, ListPlanner(), BoxExecutor(), AreaVerifier(), 2, offline=True)


class BuggyVerifier(AreaVerifier):
    async def verify(self, sample, mask):
        raise KeyError("a bug in the client, not the network")


def test_a_defect_in_a_client_is_recorded_as_a_crash_not_a_request_failure(tmp_path):
    recs, pipe = _run(tmp_path, ListPlanner(), BoxExecutor(), BuggyVerifier(), 4)
    assert all(r.error.startswith("sample:crashed KeyError") for r in recs)
    assert pipe.stats.failures["verify"] == 0 and pipe.stats.failed_samples == 2
    assert not any(c.error and c.error.startswith("request:")
                   for r in recs for c in r.candidates)


def test_masks_are_read_back_by_digest_from_the_record_alone(tmp_path):
    recs, _ = _run(tmp_path, ListPlanner(), BoxExecutor(), AreaVerifier(), 8)
    store = MaskStore(Cache(tmp_path / "cache", offline=True))  # no model, no prompt
    got = store.of(recs[0])
    assert sorted(got) == [c.index for c in recs[0].candidates if c.mask_key is not None]
    assert got[0].shape == (64, 64) and int(got[0].sum()) == recs[0].candidates[0].area


class CoinPlanner(ListPlanner):
    """Non-deterministic, like a real vLLM: every call proposes freshly drawn boxes."""

    async def plan(self, sample, indices):
        self.requests.append(list(indices))
        rng = np.random.default_rng()
        corners = rng.integers(0, 30, (len(indices), 2))
        sides = rng.integers(5, 30, (len(indices), 2))
        return [Hypothesis(index=i, prompt=Prompt(text="thing", box=(
            int(x), int(y), int(x + w), int(y + h))))
            for i, (x, y), (w, h) in zip(indices, corners, sides, strict=True)]


def test_a_job_that_loses_a_race_goes_on_with_the_answer_the_cache_serves(tmp_path):
    """Two jobs compute the same keys with a non-deterministic planner: the second to store
    must build its records from the first one's answers, the only ones the cache serves."""
    root = tmp_path / "cache"
    late = Cache(root, rescan_interval=1e9)
    assert len(late) == 0  # indexed before the other job wrote: its lookups will miss
    first, _ = _run(tmp_path, CoinPlanner(), BoxExecutor(), AreaVerifier(), max_n=4)
    slow_planner = CoinPlanner()
    pipe = Pipeline(slow_planner, BoxExecutor(), AreaVerifier(), late, max_n=4, progress=False)
    second = asyncio.run(pipe.run(OneSample(), ["a", "b"]))
    # it computed its own answers for sample a at least (b's may be found meanwhile) ...
    assert slow_planner.requests[0] == [0, 1, 2, 3]
    assert late.counts["plan.lost"] == 4 * len(slow_planner.requests)  # ... and lost
    assert [dumps(r) for r in second] == [dumps(r) for r in first]
    fresh = Pipeline(CoinPlanner(), BoxExecutor(), AreaVerifier(), Cache(root, offline=True),
                     max_n=4, progress=False)
    assert [dumps(r) for r in asyncio.run(fresh.run(OneSample(), ["a", "b"]))] == \
        [dumps(r) for r in first]


class Killed(BaseException):
    """A SIGKILL, in-process: nothing catches it and nothing is written after it."""


def test_a_kill_at_any_cache_write_resumes_to_the_uninterrupted_records(tmp_path, monkeypatch):
    """The prompt of a request is paid by its first child: had a kill kept only some answers
    of a plan request, the resumed run would ask for the rest in a new request and charge its
    prompt to another hypothesis. Killing before every cache append in turn, the resumed run's
    records always equal the uninterrupted run's."""
    from rescue import cache as cache_mod
    from rescue.models.simulated import SimulatedPlanner

    real = cache_mod._append
    appends: list[int] = []

    def counting(fd, data):
        appends.append(len(data))
        real(fd, data)

    monkeypatch.setattr(cache_mod, "_append", counting)
    reference, _ = _run(tmp_path / "reference", SimulatedPlanner(), BoxExecutor(),
                        AreaVerifier(), max_n=8)
    assert len(appends) >= 8  # segment and claims, per stage and sample: many kill points
    for k in range(len(appends)):
        calls = [0]

        def dying(fd, data, calls=calls, k=k):
            calls[0] += 1
            if calls[0] > k:
                raise Killed
            real(fd, data)

        monkeypatch.setattr(cache_mod, "_append", dying)
        with pytest.raises(Killed):
            _run(tmp_path / f"killed{k}", SimulatedPlanner(), BoxExecutor(), AreaVerifier(), 8)
        monkeypatch.setattr(cache_mod, "_append", real)
        resumed, _ = _run(tmp_path / f"killed{k}", SimulatedPlanner(), BoxExecutor(),
                          AreaVerifier(), 8)
        assert [dumps(r) for r in resumed] == [dumps(r) for r in reference], f"killed at {k}"


def test_equal_prompts_with_two_keys_are_each_cached_under_their_own(tmp_path):
    """-0.0 == 0.0, but the JSON of a prompt's key tells them apart: each prompt is read and
    stored under its own key, as when every key was computed where it was used."""

    class SignedZeroPlanner(ListPlanner):
        async def plan(self, sample, indices):
            return [Hypothesis(index=i, prompt=Prompt(text="thing", box=(
                -0.0 if i % 2 else 0.0, 0, 20, 20))) for i in indices]

    recs, pipe = _run(tmp_path, SignedZeroPlanner(), BoxExecutor(), AreaVerifier(), max_n=2)
    assert all(c.ok for r in recs for c in r.candidates)
    a, b = (Prompt(text="thing", box=(z, 0, 20, 20)) for z in (0.0, -0.0))
    assert a == b and a.key != b.key
    sample = OneSample().load("a")
    for p in (a, b):
        assert pipe.cache.get("execute", pipe.execute_key(sample, p)) is not None, p
