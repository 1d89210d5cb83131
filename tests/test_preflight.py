"""Preflight: each endpoint problem gives its own clear message, before any sample is run."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from standin import ServerThread, StandIn, VerifierScript, free_port

from rescue.models.openai_planner import OpenAIPlanner
from rescue.models.openai_verifier import OpenAIVerifier
from rescue.models.roles import Models, PreflightError, check_endpoints
from rescue.models.sam_client import SamClient

PROMPT = {"user": "{query}"}


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
    (problem,) = run(_planner(url, preflight_timeout_s=0.3).preflight())
    assert "did not answer within 0.3s" in problem
    sam_url = servers(_sam_like(delay_s=3.0))
    (sam_problem,) = run(SamClient(sam_url, preflight_timeout_s=0.3).preflight())
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
