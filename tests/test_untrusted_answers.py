"""Model answers are untrusted input: malformed masks, NaN and numpy values, odd records."""

import asyncio

import numpy as np
import pytest
from test_pipeline import AreaVerifier, BoxExecutor, ListPlanner, OneSample

from rescue import masks
from rescue.cache import Cache
from rescue.evaluation import failure_summary
from rescue.hypothesis import Hypothesis, Prompt
from rescue.pipeline import Pipeline
from rescue.protocols import Segmentation, Verdict
from rescue.records import CandidateRecord, SampleRecord


def _run(root, planner, executor, verifier, max_n=4):
    pipe = Pipeline(planner, executor, verifier, Cache(root), max_n=max_n, progress=False)
    return asyncio.run(pipe.run(OneSample(), ["a", "b"])), pipe


# -- masks.decode: pycocotools leaves pixels past a too-short RLE uninitialised ---------------

def _py_total(counts: str) -> int:
    """pycocotools' rleFrString, transcribed literally: the pixels the counts cover."""
    cnts: list[int] = []
    p = 0
    while p < len(counts):
        x = k = 0
        more = True
        while more:
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(cnts) > 2:
            x += cnts[-2]
        cnts.append(x)
    return sum(cnts)


def test_run_total_matches_a_literal_transcription_of_pycocotools():
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (7, 5), (64, 64), (300, 200)]:
        for density in (0.0, 0.01, 0.5, 1.0):
            m = rng.random((h, w)) < density
            counts = masks.encode(m)["counts"]
            assert masks._run_total(counts.encode()) == _py_total(counts) == h * w


@pytest.mark.parametrize("counts", ["", "0", "4", "PPPPP", "abc"])
def test_an_rle_that_does_not_cover_the_mask_is_an_error_not_garbage(counts):
    # before: "" decoded to a different random mask on every call (uninitialised memory)
    with pytest.raises(ValueError, match="RLE"):
        masks.decode({"size": [8, 8], "counts": counts})


def test_valid_rles_still_decode():
    m = np.zeros((5, 9), bool)
    m[1:3, 2:7] = True
    assert (masks.decode(masks.encode(m)) == m).all()
    assert not masks.decode(masks.empty(4, 4)).any()
    assert masks.decode(masks.empty(0, 0)).shape == (0, 0)


# -- pipeline: a malformed mask from the executor is a recorded failure, not a crash -----------

class BadRleExecutor(BoxExecutor):
    """The first prompt of each call comes back with an unusable RLE."""

    def __init__(self, rle):
        super().__init__()
        self.rle = rle

    async def segment(self, sample, prompts):
        out = await super().segment(sample, prompts)
        out[0] = Segmentation(rle=self.rle, score=0.5)
        return out


@pytest.mark.parametrize("rle", [
    {"size": [64, 64], "counts": "abc"},  # not COCO RLE
    {"size": [64, 64], "counts": ""},  # covers no pixel
    {"size": [64, 64], "counts": [4096]},  # uncompressed: not the protocol's Rle
    {"counts": "PPYo1"},  # no size
])
def test_a_malformed_mask_is_recorded_and_the_run_goes_on(tmp_path, rle):
    recs, _ = _run(tmp_path, ListPlanner(), BadRleExecutor(rle), AreaVerifier())
    for r in recs:
        bad = [c for c in r.candidates if c.failed_stage == "execute"]
        assert len(bad) == 2  # indices 0 and 1 share the first (broken) prompt
        assert all(c.error.startswith("execute:bad_rle") for c in bad)
        assert sum(c.failed_stage is None for c in r.candidates) == 2


# -- pipeline: answers the cache cannot store as standard JSON ---------------------------------

class NanVerifier(AreaVerifier):
    async def verify(self, sample, mask):
        self.calls += 1
        return Verdict(score=float("nan"), source="parsed", meta={"p_yes": np.float32(0.0)})


class NumpyScoreExecutor(BoxExecutor):
    async def segment(self, sample, prompts):
        out = await super().segment(sample, prompts)
        return [Segmentation(rle=s.rle, score=np.float32(0.25), box=s.box,
                             meta={0: "int key"}) for s in out]


def test_a_nan_score_is_a_failed_verification_not_a_crash(tmp_path):
    recs, _ = _run(tmp_path, ListPlanner(), BoxExecutor(), NanVerifier())
    with_mask = [c for r in recs for c in r.candidates if c.mask_key is not None]
    assert with_mask and all(c.failed_stage == "verify" for c in with_mask)
    assert all(c.verifier_score is None for c in with_mask)
    v = NanVerifier()
    recs2, _ = _run(tmp_path, ListPlanner(), BoxExecutor(), v)  # the answer was cached
    assert v.calls == 0 and [r.to_json() for r in recs2] == [r.to_json() for r in recs]


def test_numpy_scores_are_cached_and_a_resumed_run_reads_the_same(tmp_path):
    recs, _ = _run(tmp_path, ListPlanner(), NumpyScoreExecutor(), AreaVerifier())
    assert all(c.executor_score == 0.25 for r in recs for c in r.candidates if c.ok)
    e = NumpyScoreExecutor()
    recs2, pipe = _run(tmp_path, ListPlanner(), e, AreaVerifier())
    assert e.prompts == [] and pipe.stats.model_calls == 0
    assert [r.to_json() for r in recs2] == [r.to_json() for r in recs]


# -- failure_summary groups by the reason code the rest of the project uses --------------------

def test_failure_summary_keeps_the_reason_code():
    rec = SampleRecord(sample_id="a", dataset="d", query="q", height=1, width=1, target_area=1,
                       simulated=False, candidates=[
                           CandidateRecord(index=0, failed_stage="plan",
                                           error="parse:no_json nothing"),
                           CandidateRecord(index=1, failed_stage="plan",
                                           error="parse:truncated no complete object"),
                           CandidateRecord(index=2, failed_stage="execute",
                                           error="request:ConnectError: refused")])
    s = failure_summary([rec])
    assert s["by_reason"] == {"plan: parse:no_json": 1, "plan: parse:truncated": 1,
                              "execute: request:ConnectError": 1}


class NanBoxPlanner(ListPlanner):
    async def plan(self, sample, indices):
        hyps = await super().plan(sample, indices)
        if indices[0] != 0:
            return hyps
        return [Hypothesis(index=0, prompt=Prompt(box=(float("nan"), 0, 10, 10))), *hyps[1:]]


def test_a_nan_box_is_an_invalid_hypothesis_not_a_crash(tmp_path):
    recs, _ = _run(tmp_path, NanBoxPlanner(), BoxExecutor(), AreaVerifier())
    for r in recs:
        c = r.candidates[0]
        assert c.failed_stage == "plan" and c.error.startswith("plan:bad_value")
        assert r.candidates[1].failed_stage is None


def test_records_of_a_newer_version_still_read():
    from rescue.records import SampleRecord

    d = {"sample_id": "s", "dataset": "d", "query": "q", "height": 2, "width": 2,
         "target_area": 1, "simulated": False, "field_from_the_future": 1,
         "candidates": [{"index": 0, "iou": 0.5, "another_new_field": [1]}]}
    r = SampleRecord.from_json(d)
    assert r.candidates[0].iou == 0.5 and not hasattr(r, "field_from_the_future")


def test_an_answer_is_stored_as_the_standard_library_would_write_it():
    """`_storable` takes orjson's one pass, and the standard library's way where orjson
    refuses: either gives the same plain values (NaN and inf null, numpy plain, tuples lists,
    non-string keys strings, unknown objects their str)."""
    import dataclasses
    import datetime
    import json

    from rescue import records
    from rescue.pipeline import _plain, _storable

    @dataclasses.dataclass
    class Opaque:
        x: int = 1

    answer = {"nan": float("nan"), "inf": [1, 2.5, float("-inf")], "tuple": (1, (2, 3)),
              "f32": np.float32(0.1), "f64": np.float64(0.1), "i64": np.int64(7),
              "array": np.array([np.nan, 1.5], np.float32), "bool": np.bool_(True),
              "surrogate": "\ud800 lone", "int_key": {1: 2}, "big": 2 ** 70, "text": "ü",
              "neg_zero": -0.0, "tiny": 1e-7, "opaque": Opaque(),
              "when": datetime.datetime(2026, 12, 7), "none": None}
    reference = records.json_safe(json.loads(json.dumps(answer, default=_plain)))
    got = _storable(answer)
    assert json.dumps(got) == json.dumps(reference)
    assert got["nan"] is None and got["surrogate"] == "\ud800 lone" and got["big"] == 2 ** 70
    for key, value in answer.items():  # each one alone: the fast path where orjson takes it
        assert json.dumps(_storable({key: value})) == json.dumps({key: reference[key]}), key
    # a request's answers together: one pass, or each its own way where orjson refuses one
    from rescue.pipeline import _storable_all

    answers = [{key: value} for key, value in answer.items()]
    assert json.dumps(_storable_all(answers)) == json.dumps([_storable(a) for a in answers])
    plain = [a for a in answers if not {"surrogate", "big", "int_key"} & set(a)]
    assert json.dumps(_storable_all(plain)) == json.dumps([_storable(a) for a in plain])
