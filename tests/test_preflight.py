"""Preflight: each endpoint problem gives its own clear message, before any sample is run."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from standin import ServerThread, StandIn, VerifierScript, free_port

from rescue.models.openai_planner import OpenAIPlanner
from rescue.models.openai_verifier import OpenAIVerifier
from rescue.models.roles import Models, PreflightError, check_endpoints
from rescue.models.sam_client import SamClient

PROMPT = {"user": "{query}"}
FAST = {"attempts": 2, "base_delay_s": 0.01, "jitter": 0.0}


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def servers():
    started = []

    def start(app):
        srv = ServerThread(app).start()
        started.append(srv)
        return srv.url

    yield start
    for s in started:
        s.stop()


def _sam_like(delay_s: float = 0.0, ready: bool = True) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        await asyncio.sleep(delay_s)
        return {"status": "ok" if ready else "loading", "backend": "classical", "ready": ready}

    @app.get("/v1/info")
    async def info():
        return JSONResponse({"protocol": 1, "backend": "classical", "model": "grabcut",
                             "identity": {"backend": "classical"}, "max_prompts": 256})

    return app


def _planner(url, **kw):
    return OpenAIPlanner("Qwen3-VL-8B-Instruct", url, PROMPT, **kw)


def _verifier(url, **kw):
    return OpenAIVerifier("Qwen3-VL-32B-Thinking", url, PROMPT, **kw)


def test_ready_endpoints_pass(servers):
    si = StandIn({"Qwen3-VL-8B-Instruct": VerifierScript(),
                  "Qwen3-VL-32B-Thinking": VerifierScript()})
    url = servers(si.app()) + "/v1"
    assert run(_planner(url).preflight()) == []
    assert run(_verifier(url).preflight()) == []
    assert si.received["/v1/models"] == 2


def test_wrong_model_name_lists_what_is_served(servers):
    url = servers(StandIn({"Qwen2.5-VL-7B-Instruct": VerifierScript()}).app()) + "/v1"
    (problem,) = run(_planner(url).preflight())
    assert "does not serve model 'Qwen3-VL-8B-Instruct'" in problem
    assert "['Qwen2.5-VL-7B-Instruct']" in problem and url in problem


def test_endpoint_down(servers):
    url = f"http://127.0.0.1:{free_port()}/v1"
    (problem,) = run(_verifier(url).preflight())
    assert "is down or unreachable" in problem and "VERIFIER_API_BASE" in problem
    (sam_problem,) = run(SamClient(url.removesuffix("/v1")).preflight())
    assert "is down or unreachable" in sam_problem and "EXECUTOR_API_BASE" in sam_problem


def test_endpoint_slow(servers):
    si = StandIn({"Qwen3-VL-8B-Instruct": VerifierScript()}, models_delay_s=3.0)
    url = servers(si.app()) + "/v1"
    (problem,) = run(_planner(url, preflight_timeout_s=0.3, retry=FAST).preflight())
    assert "did not answer within 0.3s" in problem and "(after 2 attempts)" in problem
    assert si.received["/v1/models"] == 2  # a timeout is asked again
    sam_url = servers(_sam_like(delay_s=3.0))
    (sam_problem,) = run(SamClient(sam_url, preflight_timeout_s=0.3, retry=FAST).preflight())
    assert "did not answer within 0.3s" in sam_problem


def test_not_an_openai_endpoint_and_sam_not_ready(servers):
    sam_url = servers(_sam_like(ready=False))
    (problem,) = run(_planner(sam_url + "/v1").preflight())
    assert "answered HTTP 404" in problem
    (not_ready,) = run(SamClient(sam_url).preflight())
    assert "not ready" in not_ready


def test_app_reports_one_line_per_problem(servers):
    si = StandIn({"some-other-model": VerifierScript()})
    url = servers(si.app()) + "/v1"
    models = Models(planner=_planner(url), executor=SamClient(f"http://127.0.0.1:{free_port()}"),
                    verifier=_verifier(f"http://127.0.0.1:{free_port()}/v1"))
    with pytest.raises(PreflightError) as err:
        run(check_endpoints(models))
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 3
    assert lines[0].strip().startswith("planner: endpoint") and "does not serve" in lines[0]
    assert lines[1].strip().startswith("executor: endpoint") and "down" in lines[1]
    assert lines[2].strip().startswith("verifier: endpoint") and "down" in lines[2]


# --- preflight retries (issue 14): a failing server is asked again, a refusal is not ---------

MODELS_OK = {"object": "list", "data": [{"id": "Qwen3-VL-8B-Instruct", "object": "model"}]}
INFO_OK = {"protocol": 1, "backend": "classical", "model": "grabcut",
           "identity": {"backend": "classical"}, "max_prompts": 256,
           "capabilities": {"text": True, "box": True, "points": True}}


def _scripted(answers: dict[str, list[str]], seen: dict[str, int]) -> FastAPI:
    """A server answering each GET path from its script, one entry per request (the last
    repeats): "ok", an HTTP status ("503" carries Retry-After: 0.2), "hang" (answers after 3 s),
    "garbage" (a 200 that is not JSON) or "shape" (a 200 of JSON that is not the answer)."""
    app = FastAPI()
    bodies = {"/v1/models": MODELS_OK, "/health": {"status": "ok", "backend": "classical",
                                                   "ready": True}, "/v1/info": INFO_OK}

    def route(path):
        async def answer():
            k = seen[path] = seen.get(path, 0) + 1
            script = answers.get(path, ["ok"])
            what = script[min(k, len(script)) - 1]
            if what == "hang":
                await asyncio.sleep(3.0)
            if what in ("ok", "hang"):
                return JSONResponse(bodies[path])
            if what == "garbage":
                return PlainTextResponse('{"data": [{"id": "Qwen3-VL')
            if what == "shape":
                return JSONResponse([1, 2, 3])
            headers = {"Retry-After": "0.2"} if what == "503" else {}
            return JSONResponse({"detail": f"scripted {what}"}, status_code=int(what),
                                headers=headers)
        return answer

    for path in bodies:
        app.get(path)(route(path))
    return app


@pytest.fixture
def waits(monkeypatch):
    """The client's backoff sleeps (the test's thread only: the servers sleep in theirs)."""
    slept: list[float] = []
    real = asyncio.sleep

    async def sleep(delay, *args, **kw):
        if delay > 0 and threading.current_thread() is threading.main_thread():
            slept.append(delay)
        return await real(delay, *args, **kw)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return slept


RETRY = {"attempts": 4, "base_delay_s": 0.01, "max_delay_s": 30.0, "jitter": 0.0}


def test_a_503_with_retry_after_then_200_passes(servers, waits):
    seen: dict[str, int] = {}
    url = servers(_scripted({"/v1/models": ["503", "503", "ok"],
                             "/v1/info": ["503", "ok"]}, seen))
    assert run(_planner(url + "/v1", retry=RETRY).preflight()) == []
    assert seen["/v1/models"] == 3
    assert waits == [0.2, 0.2]  # Retry-After, not the 0.01 s backoff
    waits.clear()
    sam = SamClient(url, retry=RETRY)
    assert run(sam.preflight()) == []
    assert seen["/v1/info"] == 2 and waits == [0.2]
    assert sam.stats()["requests"] == 0  # preflight is outside the run's counters


def test_retry_after_is_capped_at_the_policys_max_delay(servers, waits):
    seen: dict[str, int] = {}
    url = servers(_scripted({"/v1/models": ["503", "ok"]}, seen))
    capped = {**RETRY, "max_delay_s": 0.05}
    assert run(_planner(url + "/v1", retry=capped).preflight()) == []
    assert waits == [0.05]


def test_a_persistent_500_gives_one_line_after_the_retries(servers):
    seen: dict[str, int] = {}
    url = servers(_scripted({"/v1/models": ["500"], "/health": ["500"]}, seen))
    (problem,) = run(_planner(url + "/v1", retry=RETRY).preflight())
    assert "\n" not in problem and problem.startswith(f"GET {url}/v1/models answered HTTP 500")
    assert problem.endswith("(after 4 attempts)") and seen["/v1/models"] == 4
    (sam_problem,) = run(SamClient(url, retry=RETRY).preflight())
    assert "answered HTTP 500" in sam_problem and seen["/health"] == 4


def test_a_refusal_is_not_retried(servers):
    seen: dict[str, int] = {}
    url = servers(_scripted({"/v1/models": ["401"], "/v1/info": ["403"]}, seen))
    (problem,) = run(_planner(url + "/v1", retry=RETRY).preflight())
    assert "answered HTTP 401" in problem and "attempts" not in problem
    assert seen["/v1/models"] == 1
    (sam_problem,) = run(SamClient(url, retry=RETRY).preflight())
    assert "answered HTTP 403" in sam_problem and seen["/v1/info"] == 1


def test_a_hang_and_malformed_200s_are_asked_again(servers):
    seen: dict[str, int] = {}
    url = servers(_scripted({"/v1/models": ["hang", "garbage", "shape", "ok"],
                             "/health": ["garbage", "ok"], "/v1/info": ["shape", "ok"]}, seen))
    assert run(_planner(url + "/v1", retry=RETRY, preflight_timeout_s=0.5).preflight()) == []
    assert seen["/v1/models"] == 4
    assert run(SamClient(url, retry=RETRY).preflight()) == []
    assert (seen["/health"], seen["/v1/info"]) == (2, 2)


def test_a_wrong_shape_after_every_retry_is_named(servers):
    seen: dict[str, int] = {}
    url = servers(_scripted({"/v1/models": ["shape"]}, seen))
    (problem,) = run(_planner(url + "/v1", retry=RETRY).preflight())
    assert "is not an OpenAI-compatible model list" in problem and seen["/v1/models"] == 4


def test_the_executor_identity_is_read_with_retries(servers):
    """identity() runs from synchronous code (the pipeline's constructor), inside an event
    loop or not: it retries like the preflight."""
    seen: dict[str, int] = {}
    url = servers(_scripted({"/v1/info": ["503", "garbage", "ok"]}, seen))
    assert SamClient(url, retry=RETRY).identity()["server"]["backend"] == "classical"
    assert seen["/v1/info"] == 3

    async def inside_a_loop():
        return SamClient(url, retry=RETRY).identity()

    assert run(inside_a_loop())["server"]["backend"] == "classical"
    url = servers(_scripted({"/v1/info": ["500"]}, seen := {}))
    client = SamClient(url, retry=RETRY)
    assert client.identity()["server"] == {"unresolved": True}
    assert "answered HTTP 500" in client._unresolved and seen["/v1/info"] == 4
