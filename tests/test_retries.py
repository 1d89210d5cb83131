"""Retries: transient failures cost a retry, never a result; permanent ones fail at once."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from faultproxy import FaultPlan, FaultProxy
from standin import (
    Faults,
    PlannerScript,
    ServerThread,
    StandIn,
    Targets,
    VerifierScript,
    overlay_iou_judge,
)

from rescue.datasets.synthetic import SyntheticDataset
from rescue.hypothesis import Prompt
from rescue.models.http import Endpoint, EndpointError, RetryPolicy, is_retryable
from rescue.models.openai_planner import OpenAIPlanner
from rescue.models.openai_verifier import OpenAIVerifier
from rescue.models.sam_client import SamClient
from rescue.models.transport import Dropped, Response, StatusError, Timeout, Unreachable

PLAN_PROMPT = {"user": 'Find "{query}" as JSON'}
VERIFY_PROMPT = {"user": "{views} {query}? yes or no"}
FAST_RETRY = {"attempts": 8, "base_delay_s": 0.01, "max_delay_s": 0.05}


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def samples():
    ds = SyntheticDataset(num_samples=3, seed=5, height=96, width=128)
    return [ds.load(i) for i in ds.sample_ids()]


@pytest.fixture
def serve_standin():
    started = []

    def start(si):
        srv = ServerThread(si.app()).start()
        started.append(srv)
        return srv.url + "/v1"

    yield start
    for s in started:
        s.stop()


def _models(samples):
    targets = Targets(samples)
    return {"planner": PlannerScript(targets, p_broken=0.2),
            "verifier": VerifierScript(overlay_iou_judge(targets))}


async def _workload(url, samples):
    planner = OpenAIPlanner("planner", url, PLAN_PROMPT, max_hypotheses_per_request=4,
                            timeout_s=1.0, retry=FAST_RETRY, base_seed=7)
    verifier = OpenAIVerifier("verifier", url, VERIFY_PROMPT, timeout_s=1.0, retry=FAST_RETRY,
                              overlay={"views": ["overlay", "image"]}, image={"format": "png"})
    plans = await asyncio.gather(*(planner.plan(s, range(12)) for s in samples))
    masks = [s.target for s in samples] + [np.roll(s.target, 9, axis=1) for s in samples]
    verdicts = await asyncio.gather(*(verifier.verify(s, m) for s, m in
                                      zip(samples + samples, masks, strict=True)))
    await planner.aclose()
    await verifier.aclose()
    return ([[h.to_json() for h in p] for p in plans], [v.to_json() for v in verdicts],
            planner.stats(), verifier.stats())


TIMINGS = ("latency_s", "server_s")
"""Measurements of one run, not answers (rescue.cost): two independent runs agree on the rest."""


def _answers(value):
    """`value` without the timings in its `cost` entries."""
    if isinstance(value, dict):
        return {k: ({n: c for n, c in v.items() if n not in TIMINGS}
                    if k == "cost" and isinstance(v, dict) else _answers(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_answers(v) for v in value]
    return value


def test_a_flaky_server_yields_exactly_the_results_of_a_clean_one(serve_standin, samples):
    clean = StandIn(_models(samples))
    plans, verdicts, pstats, vstats = run(_workload(serve_standin(clean), samples))
    assert pstats["retries"] == vstats["retries"] == 0

    flaky = StandIn(_models(samples), faults=Faults(fraction=0.3, seed=1, sleep_s=2.0,
                                                    kinds=("500", "503", "drop", "timeout")))
    fplans, fverdicts, fpstats, fvstats = run(_workload(serve_standin(flaky), samples))
    assert _answers(fplans) == _answers(plans)
    assert _answers(fverdicts) == _answers(verdicts)
    assert "latency_s" in plans[0][0]["meta"]["cost"]  # what _answers leaves out is there
    served = sum(flaky.faults_served.values())
    assert served > 0
    # every fault cost exactly one retry, and no call failed for good
    assert fpstats["retries"] + fvstats["retries"] == served
    assert fpstats["failures"] == fvstats["failures"] == 0
    assert fpstats["requests"] == fpstats["ok"] + fpstats["retries"]


def test_malformed_200s_from_the_chat_server_are_retried(serve_standin, samples):
    """A 200 cut short, not JSON, or of another shape (no choices, fewer than n) is garbled
    transport, not a model's answer: asked again, the run gets the clean answers and loses
    nothing."""
    plans, verdicts, _, _ = run(_workload(serve_standin(StandIn(_models(samples))), samples))
    upstream = serve_standin(StandIn(_models(samples))).removesuffix("/v1")
    body_faults = ("cut", "truncate", "garbage", "shape")
    plan = FaultPlan.even(0.4, kinds=body_faults, seed=5)
    with FaultProxy(upstream, plan, script=[*body_faults, *["shape"] * 6]) as proxy:
        fplans, fverdicts, fpstats, fvstats = run(_workload(proxy.url + "/v1", samples))
    assert _answers(fplans) == _answers(plans)
    assert _answers(fverdicts) == _answers(verdicts)
    assert set(proxy.injected) == set(body_faults)
    assert fpstats["retries"] + fvstats["retries"] == sum(proxy.injected.values())
    assert fpstats["failures"] == fvstats["failures"] == 0


def test_retries_are_bounded_and_counted(serve_standin, samples):
    si = StandIn(_models(samples), faults=Faults(fraction=1.0, kinds=("500",)))
    url = serve_standin(si)
    verifier = OpenAIVerifier("verifier", url, VERIFY_PROMPT,
                              retry={"attempts": 3, "base_delay_s": 0.01})
    with pytest.raises(EndpointError, match="after 3 attempts") as err:
        run(verifier.verify(samples[0], samples[0].target))
    assert err.value.retryable and err.value.status == 500
    st = verifier.stats()
    assert (st["calls"], st["requests"], st["retries"], st["failures"]) == (1, 3, 2, 1)


def test_client_errors_are_not_retried(serve_standin, samples):
    url = serve_standin(StandIn(_models(samples)))
    planner = OpenAIPlanner("no-such-model", url, PLAN_PROMPT, retry=FAST_RETRY)
    with pytest.raises(EndpointError, match="404") as err:
        run(planner.plan(samples[0], [0, 1]))
    assert not err.value.retryable
    assert planner.stats()["requests"] == 1 and planner.stats()["failures"] == 1


def test_a_failed_chunk_keeps_the_others_as_partial(serve_standin, samples):
    script = PlannerScript(Targets(samples))

    def fails_at_seed_4(req):
        if req.seed == 4:
            raise RuntimeError("engine died")
        return script(req)

    url = serve_standin(StandIn({"planner": fails_at_seed_4}))
    planner = OpenAIPlanner("planner", url, PLAN_PROMPT, max_hypotheses_per_request=4,
                            retry={"attempts": 2, "base_delay_s": 0.01})
    with pytest.raises(EndpointError) as err:
        run(planner.plan(samples[0], range(12)))
    assert [h.index for h in err.value.partial] == [0, 1, 2, 3, 8, 9, 10, 11]


def test_executor_retries_overload(samples):
    calls = []
    app = FastAPI()

    @app.post("/v1/segment")
    async def segment(body: dict):
        calls.append(body)
        if len(calls) == 1:
            return JSONResponse({"detail": {"code": "overloaded", "message": "busy",
                                            "retry_after": 0}}, status_code=503,
                                headers={"Retry-After": "0"})
        s = samples[0]
        return {"image_sha256": s.image_sha256, "width": s.width, "height": s.height,
                "image_cached": False, "results": [{"instances": [], "error": None}],
                "backend": "fake", "model": "fake", "timing_ms": {}}

    with ServerThread(app) as srv:
        client = SamClient(srv.url, retry={"attempts": 3, "base_delay_s": 0.01})
        (seg,) = run(client.segment(samples[0], [Prompt(box=(1, 1, 30, 30))]))
    assert seg.ok and {k: v for k, v in seg.meta.items() if k != "cost"} == {"instances": 0}
    assert (seg.meta["cost"]["calls"], seg.meta["cost"]["prompts"]) == (1, 1)  # one call, resent
    assert client.stats()["retries"] == 1 and len(calls) == 2


# --- the Endpoint itself ---------------------------------------------------------------------


def test_endpoint_limits_concurrency_and_retries_transient_errors():
    ep = Endpoint("t", "http://t", max_concurrency=2, retry={"attempts": 4, "base_delay_s": 0})
    failures = {k: 2 if k % 3 == 0 else 0 for k in range(10)}

    async def job(k):
        async def once():
            await asyncio.sleep(0.02)
            if failures[k] > 0:
                failures[k] -= 1
                raise Unreachable("refused")
            return k

        return await ep.call(once)

    async def main():
        return await asyncio.gather(*(job(k) for k in range(10)))

    assert run(main()) == list(range(10))
    st = ep.stats()
    assert st["max_in_flight"] == 2
    assert (st["calls"], st["ok"], st["retries"], st["failures"]) == (10, 10, 8, 0)
    assert st["requests"] == 18


def test_retryable_classification():
    def status(code):
        return StatusError("x", Response(code, {}, b""))

    assert is_retryable(Timeout("slow")) and is_retryable(Dropped("dropped"))
    assert is_retryable(Unreachable("refused")) and is_retryable(asyncio.TimeoutError())
    assert is_retryable(status(500)) and is_retryable(status(503)) and is_retryable(status(429))
    assert is_retryable(status(408)) and is_retryable(status(409))
    assert not is_retryable(status(400)) and not is_retryable(status(404))
    assert not is_retryable(status(422)) and not is_retryable(ValueError("bug"))
    assert not is_retryable(ConnectionError("not the transport's: a bug"))


def test_backoff_grows_exponentially_within_the_jitter_band():
    policy = RetryPolicy(attempts=6, base_delay_s=0.5, max_delay_s=4.0, jitter=0.5)
    rng = random.Random(0)
    for k in range(8):
        nominal = min(4.0, 0.5 * 2**k)
        for _ in range(50):
            d = policy.delay(k, rng)
            assert 0.5 * nominal <= d <= 1.5 * nominal


def test_endpoint_waits_the_retry_after_capped_and_counts_its_attempts(monkeypatch):
    """The one retry runner (RetryPolicy.run) under Endpoint.call: Retry-After longer than
    the backoff is waited, capped at max_delay_s; a refusal stops at once; every attempt and
    retry is counted."""
    slept: list[float] = []

    async def sleep(delay, *args, **kw):
        slept.append(delay)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    def status(code, after=None):
        headers = {"retry-after": after} if after is not None else {}
        return StatusError("x", Response(code, headers, b""))

    ep = Endpoint("t", "http://t", retry={"attempts": 4, "base_delay_s": 0.01,
                                          "max_delay_s": 2.0, "jitter": 0.0})
    errors = [status(503, "1.5"), status(429, "60"), status(503, "Wed, 21 Oct 2015 07:28:00 GMT")]

    async def flaky():
        if errors:
            raise errors.pop(0)
        return "ok"

    assert run(ep.call(flaky)) == "ok"
    assert slept == [1.5, 2.0, 0.04]  # Retry-After, capped; an HTTP date: the backoff
    st = ep.stats()
    assert (st["calls"], st["requests"], st["retries"], st["ok"], st["failures"]) == (1, 4, 3, 1, 0)

    slept.clear()

    async def refused():
        raise status(404, "5")

    with pytest.raises(EndpointError) as err:
        run(ep.call(refused))
    assert err.value.attempts == 1 and not err.value.retryable and slept == []

    async def down():
        raise status(503)

    with pytest.raises(EndpointError) as err:
        run(ep.call(down, what="segment"))
    assert err.value.attempts == 4 and err.value.retryable and err.value.status == 503
    assert "segment failed after 4 attempts" in str(err.value)
    assert slept == [0.01, 0.02, 0.04]  # no wait after the last attempt
    st = ep.stats()
    assert (st["calls"], st["requests"], st["retries"], st["failures"]) == (3, 9, 6, 2)


def test_a_resumed_run_retries_only_what_failed(serve_standin, samples, tmp_path):
    from rescue.cache import Cache
    from rescue.models.classical import ClassicalExecutor
    from rescue.pipeline import Pipeline

    class _Samples:
        name = "synthetic"

        def sample_ids(self):
            return [s.sample_id for s in samples]

        def load(self, sid):
            return next(s for s in samples if s.sample_id == sid)

    models = _models(samples)
    working_verifier = models["verifier"]

    def down(req):
        raise RuntimeError("verifier engine is down")

    models["verifier"] = down
    si = StandIn(models)
    url = serve_standin(si)

    async def once():
        planner = OpenAIPlanner("planner", url, PLAN_PROMPT, retry=FAST_RETRY)
        verifier = OpenAIVerifier("verifier", url, VERIFY_PROMPT,
                                  retry={"attempts": 2, "base_delay_s": 0.01})
        pipe = Pipeline(planner, ClassicalExecutor(), verifier, Cache(tmp_path / "cache"),
                        max_n=6, progress=False)
        recs = await pipe.run(_Samples(), _Samples().sample_ids())
        await planner.aclose()
        await verifier.aclose()
        return recs, pipe.stats

    recs, stats = run(once())
    failed = [c for r in recs for c in r.candidates if c.failed_stage == "verify"]
    assert failed and all(c.error.startswith("request:") for c in failed)
    plan_requests = len(si.chat_requests("planner"))

    models["verifier"] = working_verifier  # the engine is back: resume
    recs2, stats2 = run(once())
    assert len(si.chat_requests("planner")) == plan_requests  # plans came from the cache
    assert stats2.requests["plan"] == 0 and stats2.requests["execute"] == 0
    assert stats2.requests["verify"] == stats.failures["verify"]  # exactly the failed ones
    assert not any(c.failed_stage == "verify" for r in recs2 for c in r.candidates)
