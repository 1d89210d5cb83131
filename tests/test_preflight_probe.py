"""The preflight probe (issue 8): one real request of the run per endpoint catches what would
otherwise make every call a 400, one line per problem, before any sample is run. The stand-in
refuses with vLLM's own wording and status codes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from standin import Faults, ServerThread, StandIn, VerifierScript

from rescue.models import probe
from rescue.models.openai_planner import OpenAIPlanner
from rescue.models.openai_verifier import OpenAIVerifier
from rescue.models.roles import Models, PreflightError, check_endpoints
from rescue.sample import Sample

ROOT = Path(__file__).resolve().parents[1]
PLANNER, VERIFIER = "Qwen3-VL-8B-Instruct", "Qwen3-VL-32B-Thinking"
TWO_VIEWS = {"views": ["overlay", "crop"]}  # as conf/verifier/qwen3vl_32b_thinking.yaml


def _sample(h=48, w=64):
    rng = np.random.default_rng(0)
    return Sample(sample_id="s0", query="the cup",
                  image=rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                  gt=np.zeros((h, w), np.uint8))


@pytest.fixture
def serve():
    started = []

    def start(**kw):
        si = StandIn({PLANNER: VerifierScript(), VERIFIER: VerifierScript()}, **kw)
        srv = ServerThread(si.app()).start()
        started.append(srv)
        return si, srv.url + "/v1"

    yield start
    for s in started:
        s.stop()


def _models(url, *, planner=None, verifier=None):
    return Models(planner=OpenAIPlanner(PLANNER, url, "find {query}", **(planner or {})),
                  executor=None,
                  verifier=OpenAIVerifier(VERIFIER, url, "{views}: is it {query}?",
                                          **{"overlay": TWO_VIEWS, **(verifier or {})}))


def _problems(models, sample=None):
    async def check():
        try:
            await check_endpoints(models, sample or _sample())
        finally:
            for m in (models.planner, models.verifier):
                await m.aclose()

    try:
        asyncio.run(check())
    except PreflightError as exc:
        return [line.strip() for line in str(exc).splitlines()[1:]]
    return []


def test_a_healthy_server_passes_and_is_probed_once_with_the_runs_payload(serve):
    si, url = serve()
    assert _problems(_models(url, verifier={"sampling": {"max_tokens": 4096}})) == []
    (plan,) = si.chat_requests(PLANNER)
    (verify,) = si.chat_requests(VERIFIER)
    assert plan["max_tokens"] == verify["max_tokens"] == 1
    assert plan["n"] == 16 and plan["seed"] == 0           # the run's first request
    assert verify["logprobs"] is True and verify["top_logprobs"] == 20
    assert probe.count_images(verify["messages"]) == 2     # overlay + crop, as the run sends
    images = [p for p in verify["messages"][-1]["content"] if p["type"] == "image_url"]
    assert all(p["uuid"].startswith("rescue-") for p in images)  # named, as the run's are


def test_no_sample_means_no_probe(serve):
    si, url = serve()
    asyncio.run(check_endpoints(_models(url)))
    assert si.chat_requests() == [] and si.received["/v1/models"] == 2


def test_top_logprobs_above_the_servers_limit(serve):
    _, url = serve(max_logprobs=5)
    (line,) = _problems(_models(url, verifier={"sampling": {"max_tokens": 4096}}))
    assert line.startswith("verifier: the server refused the run's request (HTTP 400")
    assert "max allowed: 5" in line and "--max-logprobs 20" in line
    assert "verifier.top_logprobs" in line


def test_more_views_than_the_servers_image_limit(serve):
    _, url = serve(max_images=1)
    (line,) = _problems(_models(url, verifier={"sampling": {"max_tokens": 4096}}))
    assert line.startswith("verifier:") and "At most 1 image(s)" in line
    assert "--limit-mm-per-prompt '{\"image\": 2}'" in line


def test_prompt_plus_max_tokens_past_max_model_len(serve):
    """The shipped verifier asks for 40960 tokens (Qwen's card); a server started with
    --max-model-len 16384 would refuse every verification."""
    _, url = serve(max_model_len=16384)
    (line,) = _problems(_models(url, verifier={"sampling": {"max_tokens": 40960}}))
    assert line.startswith("verifier: the prompt (") and "max_tokens=40960" in line
    assert "max_model_len=16384" in line and "--max-model-len >=" in line


def test_structured_output_the_server_cannot_honour(serve):
    _, url = serve(structured_outputs=False)
    (line,) = _problems(_models(url, planner={"structured_output": True},
                                verifier={"sampling": {"max_tokens": 4096}}))
    assert line.startswith("planner:") and "xgrammar" in line
    assert "planner.structured_output=false" in line


def test_every_problem_is_its_own_line(serve):
    _, url = serve(max_logprobs=5, structured_outputs=False)
    lines = _problems(_models(url, planner={"structured_output": True},
                              verifier={"sampling": {"max_tokens": 4096}}))
    assert [line.split(":")[0] for line in lines] == ["planner", "verifier"]


def test_an_endpoint_that_is_down_is_reported_without_probing_the_others(serve):
    si, url = serve()
    models = _models(url)
    models.verifier = OpenAIVerifier(VERIFIER, "http://127.0.0.1:9/v1", "{query}")
    lines = _problems(models)
    assert len(lines) == 1 and lines[0].startswith("verifier: endpoint")
    assert si.chat_requests() == []


def test_the_run_fails_fast_with_one_line_per_problem(tmp_path, serve):
    """run.py on a server with --max-logprobs 5: non-zero, no traceback, no sample run."""
    si, url = serve(max_logprobs=5)
    env = {**os.environ, "PLANNER_API_BASE": url, "VERIFIER_API_BASE": url,
           "EXECUTOR_API_BASE": "http://127.0.0.1:9", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'run'}",
           f"paths.cache_dir={tmp_path / 'cache'}", "experiment=http_synthetic",
           "executor=simulated", "verifier.sampling.max_tokens=4096", "dataset.num_samples=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert err[-2] == "rescue: preflight failed:" and err[-1].strip().startswith("verifier:")
    assert "--max-logprobs" in err[-1]
    assert all(b["max_tokens"] == 1 for b in si.chat_requests())  # only the probes ran


def test_the_request_after_a_refusal_on_the_same_images_survives_vllms_one_500(serve):
    """vLLM answers 500 once to the next request with the images of a 400: a verification
    refused for its length, then one that fits on the same images, must still be scored."""
    from rescue.models.http import EndpointError

    si, url = serve(max_model_len=20000)
    sample = _sample()
    mask = np.zeros(sample.image.shape[:2], bool)
    mask[12:36, 16:48] = True

    def verifier(max_tokens):
        return OpenAIVerifier(VERIFIER, url, "{views}: is it {query}?", overlay=TWO_VIEWS,
                              sampling={"max_tokens": max_tokens}, retry={"base_delay_s": 0.0})

    async def verify(v):
        try:
            return await v.verify(sample, mask)
        finally:
            await v.aclose()

    with pytest.raises(EndpointError) as refused:
        asyncio.run(verify(verifier(40960)))
    assert refused.value.status == 400 and "maximum context length is 20000" in str(
        refused.value)
    fits = verifier(4096)
    verdict = asyncio.run(verify(fits))
    assert verdict.error is None and verdict.score is not None
    assert fits.stats()["retries"] == 1 and si.faults_served["500"] == 0  # vLLM's, not a fault


def test_rejection_hints_name_the_setting():
    payload = {"top_logprobs": 20, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}] * 3}]}
    assert "--limit-mm-per-prompt '{\"image\": 3}'" in probe.rejection(
        400, "At most 2 image(s) may be provided in one prompt.", role="verifier",
        payload=payload)
    assert "every call" in probe.rejection(400, "something else", role="planner",
                                           payload=payload)
    assert "verifier.continuation_images=resend" in probe.rejection(
        400, "Unrecognized key 'uuid' in messages[0].content[0]", role="verifier",
        payload=payload)
    assert probe.context_problem(100, 900, 1000, role="verifier", images=2) is None
    assert "at most 900" in probe.context_problem(100, 901, 1000, role="verifier", images=2)
    assert probe.context_problem(None, 10**6, 1000, role="verifier", images=0) is None
    assert probe.max_model_len({"max_model_len": 4096}) == 4096
    assert probe.max_model_len({}) is None and probe.max_model_len(None) is None


def test_a_failing_server_is_named_not_blamed_on_the_payload(serve):
    """A server answering 503 to every probe is failing or busy, not refusing the payload:
    the probe tries as often as the endpoint's retry policy says, then says so (and how to
    skip it)."""
    si, url = serve(faults=Faults(fraction=1.0, kinds=("503",)))
    three = {"attempts": 3, "base_delay_s": 0.01}  # the endpoint's retry policy
    lines = _problems(_models(url, planner={"retry": three},
                              verifier={"sampling": {"max_tokens": 4096}, "retry": three}))
    assert len(lines) == 2 and all("failed 3 times, last: HTTP 503" in x for x in lines)
    assert "pipeline.probe=false" in lines[0] and "refused" not in lines[0]
    assert si.faults_served["503"] == 6
