"""Permanent vs transient failures, the stage guard that stops a hopeless run, failure shares
(issue 8: a server refusing every request cost a night and exited 0 with gIoU numbers)."""

import asyncio

import pytest

from rescue.cache import Cache
from rescue.evaluation import failure_shares, truncation_shares
from rescue.failures import RunAborted, StageGuard, classify
from rescue.models.http import EndpointError
from rescue.pipeline import Pipeline
from rescue.records import CandidateRecord, SampleRecord
from tests.test_pipeline import AreaVerifier, BoxExecutor, ListPlanner, OneSample


class RefusingVerifier(AreaVerifier):
    """A server that answers 400 to every verification (e.g. top_logprobs > --max-logprobs)."""

    def __init__(self, status=400):
        super().__init__()
        self.status = status

    async def verify(self, sample, mask):
        self.calls += 1
        raise EndpointError("http://v", f"verify failed: BadRequestError (HTTP {self.status}): "
                            "top_logprobs 20 > max_logprobs 5", status=self.status)


def _pipe(tmp_path, verifier, guard=None):
    return Pipeline(ListPlanner(), BoxExecutor(), verifier, Cache(tmp_path / "cache"), max_n=8,
                    progress=False, guard=guard or StageGuard(min_calls=100))


@pytest.mark.parametrize(("status", "transient"), [
    (400, False), (404, False), (413, False), (422, False),
    (408, True), (409, True), (429, True), (500, True), (503, True), (None, True)])
def test_a_4xx_other_than_408_409_429_is_permanent(status, transient):
    f = classify(EndpointError("http://x", "failed", status=status))
    assert f.transient is transient
    assert f.error.startswith("request:rejected" if not transient else "request:")


def test_a_permanent_refusal_is_cached_and_not_retried_on_resume(tmp_path):
    v = RefusingVerifier()
    recs = asyncio.run(_pipe(tmp_path, v).run(OneSample(), ["a", "b"]))
    failed = [c for r in recs for c in r.candidates if c.failed_stage == "verify"]
    assert failed and all(c.error.startswith("request:rejected HTTP 400") for c in failed)
    first = v.calls
    v2 = RefusingVerifier()
    recs2 = asyncio.run(_pipe(tmp_path, v2).run(OneSample(), ["a", "b"]))
    assert first == 6 and v2.calls == 0  # the refusal is the answer to this exact request
    assert [c.error for r in recs2 for c in r.candidates] == \
        [c.error for r in recs for c in r.candidates]


def test_a_transient_failure_is_asked_again_on_resume(tmp_path):
    asyncio.run(_pipe(tmp_path, RefusingVerifier(status=503)).run(OneSample(), ["a", "b"]))
    v2 = AreaVerifier()
    recs = asyncio.run(_pipe(tmp_path, v2).run(OneSample(), ["a", "b"]))
    assert v2.calls == 6 and not [c for r in recs for c in r.candidates
                                  if c.failed_stage == "verify"]


def test_the_guard_stops_a_stage_that_fails_for_most_of_its_first_calls(tmp_path):
    pipe = _pipe(tmp_path, RefusingVerifier(), guard=StageGuard(min_calls=4,
                                                                max_failure_share=0.5))
    with pytest.raises(RunAborted) as info:
        asyncio.run(pipe.run(OneSample(), ["a", "b"]))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("verify: 4 of the first 4 calls failed")
    assert "request:rejected" in msg and "max_logprobs" in msg


def test_the_guard_lets_a_healthy_share_through():
    g = StageGuard(min_calls=10, max_failure_share=0.5)
    for i in range(100):
        g.record("verify", "request:rejected HTTP 400 x" if i % 3 == 0 else None)
    assert g.shares()["verify"] == pytest.approx(34 / 100)
    with pytest.raises(ValueError, match="min_calls"):
        StageGuard(min_calls=0)


def _rec(*cands):
    return SampleRecord(sample_id="s", dataset="d", query="q", height=1, width=1, target_area=1,
                        simulated=False,
                        candidates=list(cands))


def test_failure_and_truncation_shares_count_the_candidates_that_reached_each_stage():
    recs = [_rec(CandidateRecord(0, "plan", "parse:truncated x"),
                 CandidateRecord(1, "plan", "ground:no_object empty list"),
                 CandidateRecord(2, "execute", "request:rejected HTTP 400"),
                 CandidateRecord(3, "verify", "verify:truncated cut"),
                 CandidateRecord(4), CandidateRecord(5))]
    assert failure_shares(recs) == {"plan": 2 / 6, "execute": 1 / 4, "verify": 1 / 3}
    assert truncation_shares(recs) == {"plan": 1 / 6, "verify": 1 / 3}
