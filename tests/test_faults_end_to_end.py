"""A whole run under faults (issue 14): `python run.py` with the real clients against the vLLM
stand-in and the SAM server, each behind tests/faultproxy.py answering 30% of every request
(preflight GETs, probes and the work's POSTs) with a 500, a 503, a hang, a drop, a cut or
truncated body, a non-JSON 200 or JSON of the wrong shape. In one pass, with no resume, its
records and metrics equal a clean run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from faultproxy import KINDS, FaultPlan, FaultProxy
from sam_harness import running_server
from standin import PlannerScript, ServerThread, StandIn, Targets, VerifierScript
from standin import overlay_iou_judge as iou_judge
from test_http_end_to_end import MODELS, PLANNER, ROOT, RUN, VERIFIER
from test_http_end_to_end import samples as samples  # the fixture: the run's synthetic samples

pytestmark = pytest.mark.slow

TIMEOUT_S = 4.0  # the work's client timeout (a GrabCut request takes ~1 s here); a hang is longer
PREFLIGHT_TIMEOUT_S = 2.0  # the preflight's GETs answer in milliseconds
RETRY = {"attempts": 16, "base_delay_s": 0.05, "max_delay_s": 0.5, "jitter": 0.5}
"""Room for the scripted faults (eight in a row for a lone first call) and the drawn ones."""
CLIENT = {"timeout_s": TIMEOUT_S, "preflight_timeout_s": PREFLIGHT_TIMEOUT_S,
          **{f"retry.{k}": v for k, v in RETRY.items()}}
CLIENTS = [f"{role}.{key}={value}" for role in ("planner", "executor", "verifier")
           for key, value in CLIENT.items()]
TIMINGS = ("latency_s", "server_s")
"""Measurements of one run, not answers (rescue.cost), wherever they are in a record."""


@contextmanager
def serving(samples, log_dir: Path):
    """The stand-in (a thread here) and a SAM server (classical, in its own process), yielding
    their URLs (vLLM's without /v1). The SAM server keeps no image embeddings
    (--image-cache-size 0): whether a call encodes then depends on nothing a fault did (a
    garbled 200 was computed, so its retry would find the image cached), and the cost columns
    compare exactly. benchmarks/bench_fault_sweep.py serves with it too."""
    targets = Targets(samples)
    standin = StandIn({PLANNER: PlannerScript(targets, p_broken=0.3),
                       VERIFIER: VerifierScript(iou_judge(targets))})
    vllm = ServerThread(standin.app()).start()
    try:
        with running_server(log_dir, "--image-cache-size", "0") as sam:
            yield vllm.url, sam.url
    finally:
        vllm.stop()


@pytest.fixture(scope="module")
def servers(samples, tmp_path_factory):
    with serving(samples, tmp_path_factory.mktemp("sam")) as urls:
        yield urls


def launch(run_dir, vllm_url, sam_url, cache_dir):
    """`python run.py` of this test's workload against these servers (or their proxies)."""
    env = {**os.environ, "PLANNER_API_BASE": vllm_url + "/v1",
           "VERIFIER_API_BASE": vllm_url + "/v1", "EXECUTOR_API_BASE": sam_url,
           "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "run.py", f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}",
           *MODELS, *RUN, *CLIENTS]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def run_ok(run_dir, vllm_url, sam_url, cache_dir):
    proc = launch(run_dir, vllm_url, sam_url, cache_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def _answers(value):
    """`value` without its timings (a record's costs nest them by stage)."""
    if isinstance(value, dict):
        return {k: _answers(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_answers(v) for v in value]
    return value


def records(run_dir):
    """The run's records without their timings: what a faulty run must equal."""
    return [_answers(json.loads(line))
            for line in (run_dir / "records.jsonl").read_text().splitlines()]


def test_a_run_under_30_percent_faults_equals_a_clean_run_in_one_pass(tmp_path, servers):
    vllm_url, sam_url = servers
    clean = run_ok(tmp_path / "clean", vllm_url, sam_url, tmp_path / "cache-clean")
    plan = FaultPlan.even(0.3, seed=0, hang_s=2 * TIMEOUT_S)
    # besides the 30% drawn, every kind once at each proxy, on its first requests (a workload
    # this small might not draw them all)
    with FaultProxy(vllm_url, plan, KINDS) as chat, FaultProxy(sam_url, plan, KINDS) as sam:
        faulty = run_ok(tmp_path / "faulty", chat.url, sam.url, tmp_path / "cache-faulty")
    assert records(faulty) == records(clean)
    assert (faulty / "metrics.csv").read_text() == (clean / "metrics.csv").read_text()
    # the faults happened, every kind at each server, on GETs (preflight) and POSTs (work) ...
    for proxy in (chat, sam):
        assert set(proxy.injected) == set(KINDS)
        assert {method for method, _ in proxy.by_method} == {"GET", "POST"}
    # ... and each cost the work a retry, not an answer: nothing failed, nothing is left
    endpoints = json.loads((faulty / "stats.json").read_text())["endpoints"]
    assert all(e["failures"] == 0 for e in endpoints.values())
    posted = sum(n for proxy in (chat, sam) for (m, _), n in proxy.by_method.items()
                 if m == "POST")
    assert 0 < sum(e["retries"] for e in endpoints.values()) <= posted  # probes: uncounted
    assert not any((c["error"] or "").startswith("request:")
                   for r in records(faulty) for c in r["candidates"])
