"""The real-vLLM tier: the project's clients and the wire facts they rely on, against vLLM's CPU
build serving tiny random Qwen3-VL models (conftest.py starts them; build_tiny_qwen3vl.py makes
them). Run with

    .venv-vllm/bin/python -m pytest -m vllm tests/vllm

A random model answers noise, so these tests assert what must hold whatever it says: the run
ends, every failure is a classified `area:code`, a reply cut off at max_tokens is never scored,
scores lie in [0, 1]; and the wire format vLLM really speaks (seeds under `n`, the logprobs
layout, the reasoning field, usage, the 400s past a server limit).

`RESCUE_VLLM_CAPTURE=1` also writes the raw request/response pairs of the wire tests to
tests/fixtures/vllm_captured/ (the stand-in's reference; see its README.md).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from vllm_harness import (
    MAX_MODEL_LEN,
    PLANNER,
    PLANNER_MAX_LOGPROBS,
    ROOT,
    VERIFIER,
    VERIFIER_MAX_LOGPROBS,
    Servers,
)

pytestmark = pytest.mark.vllm

CAPTURED = ROOT / "tests" / "fixtures" / "vllm_captured"
CODE = re.compile(r"^(parse|ground|box|point|plan|execute|verify|request):[a-z_]+(\s|$)")
"""A classified failure: a stable `area:code` head (rescue.records.reason_code)."""
SAMPLES, MAX_N = 4, 4
EOS = "<|im_end|>"
MASKED = -9999.0


# --- helpers ---------------------------------------------------------------------------------


def png_url(color: tuple[int, int, int], size: int = 64) -> str:
    """A small solid image as a data URL (64 x 64: 4 visual tokens, a few hundred bytes)."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def body(model: str, text: str, images: int = 1, **fields: Any) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": png_url((200, 40, 40))}}
               for _ in range(images)]
    return {"model": model, "messages": [{"role": "user", "content": [
        *content, {"type": "text", "text": text}]}], **fields}


PLANNER_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0,
                    "presence_penalty": 1.5, "repetition_penalty": 1.0}
VERIFIER_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
                     "presence_penalty": 0.0, "repetition_penalty": 1.0}
SCHEMA = {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
    "label": {"type": "string"},
    "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4}},
    "required": ["label", "bbox_2d"]}}


def post(server, payload: dict[str, Any], capture: str | None = None,
         note: str = "") -> httpx.Response:
    r = httpx.post(server.api + "/chat/completions", json=payload, timeout=600)
    if capture and os.environ.get("RESCUE_VLLM_CAPTURE") == "1":
        save(capture, note, server, "POST /v1/chat/completions", payload, r)
    return r


def save(name: str, note: str, server, what: str, payload: Any, r: httpx.Response) -> None:
    CAPTURED.mkdir(parents=True, exist_ok=True)
    import vllm

    record = {"what": note, "vllm": vllm.__version__, "served_model_name": server.name,
              "server_flags": server.args, "request": {"line": what, "body": payload},
              "response": {"status": r.status_code, "body": r.json()}}
    (CAPTURED / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")


def texts(resp: dict[str, Any]) -> list[str | None]:
    return [c["message"]["content"] for c in sorted(resp["choices"], key=lambda c: c["index"])]


# --- (a) the real clients, end to end through run.py ----------------------------------------


def _cache_values(cache: Path, stage: str) -> list[dict[str, Any]]:
    out = []
    for seg in sorted((cache / stage).glob("*.jsonl")):
        out += [json.loads(x)["v"] for x in seg.read_text().splitlines() if x.strip()]
    return out


def test_run_py_with_real_vllm_planner_and_thinking_verifier(servers: Servers,
                                                            tmp_path: Path) -> None:
    """`python run.py` with the real clients: planner (structured output) and thinking verifier
    on vLLM, the SAM server's classical backend as executor. Noise in, a finished run out."""
    cache = tmp_path / "cache"
    env = {**os.environ, "PLANNER_API_BASE": servers.planner.api,
           "VERIFIER_API_BASE": servers.verifier.api, "EXECUTOR_API_BASE": servers.sam_url,
           "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'run'}",
           f"paths.cache_dir={cache}", "experiment=http_synthetic", "seed=0",
           f"dataset.num_samples={SAMPLES}", f"max_n={MAX_N}", "n_grid=[1,2,4]",
           "executor.prompt_mode=box",  # what the classical backend serves
           "planner.structured_output=true", "planner.sampling.max_tokens=160",
           "verifier.sampling.max_tokens=48", f"verifier.top_logprobs={VERIFIER_MAX_LOGPROBS}",
           "selection.bootstrap=0", "report.overlays=1",
           "logger=none", "pipeline.progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "records.jsonl").read_text().splitlines()]
    assert len(records) == SAMPLES and len({r["sample_id"] for r in records}) == SAMPLES
    stats = json.loads((run / "stats.json").read_text())
    assert stats["simulated"] is False
    assert stats["calls"]["requests"]["plan"] == SAMPLES  # one request of n=MAX_N per sample
    cands = [c for r in records for c in r["candidates"]]
    assert all(r["error"] is None for r in records), [r["error"] for r in records]
    assert len(cands) == SAMPLES * MAX_N
    for c in cands:  # every failure classified; nothing crashed
        if c["error"] is not None:
            assert CODE.match(c["error"]), c["error"]
            assert c["failed_stage"] in ("plan", "execute", "verify"), c
        if c["verifier_source"] == "logprobs":
            assert 0.0 <= c["verifier_score"] <= 1.0, c
    plan_failures = [c for c in cands if c["failed_stage"] == "plan"]
    assert all(not c["error"].startswith("request:") for c in plan_failures), plan_failures
    assert any(c["failed_stage"] != "plan" for c in cands), "no hypothesis parsed at all"

    hyps = _cache_values(cache, "plan")
    assert len(hyps) == SAMPLES * MAX_N
    for h in hyps:
        assert h["meta"].get("finish_reason") in ("stop", "length"), h
        if h["error"] is not None:
            assert CODE.match(h["error"]), h["error"]
            if h["meta"]["finish_reason"] == "length":  # cut off: never "found nothing"
                assert not h["error"].startswith("ground:no_object"), h
    verdicts = _cache_values(cache, "verify")
    assert verdicts, "no mask reached the verifier"
    for v in verdicts:
        if v["source"] == "rule":  # an empty mask is scored without a call
            assert v["meta"] == {"rule": "empty_mask"} and v["score"] == 0.0, v
            continue
        finish = v["meta"].get("finish_reason")
        assert finish in ("stop", "length"), v
        if finish == "length":
            assert v["error"].startswith("verify:truncated") and v["score"] is None, v
        elif v["error"] is not None:
            assert CODE.match(v["error"]) and v["score"] is None, v
        else:
            assert 0.0 <= v["score"] <= 1.0 and v["source"] in ("logprobs", "parsed"), v
        if v["source"] == "logprobs":
            assert 0.0 <= v["meta"]["p_yes"] <= 1.0 and 0.0 <= v["meta"]["p_no"] <= 1.0
    print(f"\nrun: {len(hyps)} hypotheses "
          f"({sum(h['error'] is None for h in hyps)} parsed), {len(verdicts)} verdicts "
          f"({sum(v['meta'].get('finish_reason') == 'length' for v in verdicts)} truncated, "
          f"{sum(v['source'] == 'logprobs' for v in verdicts)} from logprobs)")
    assert (run / "metrics.csv").is_file() and (run / "summary.json").is_file()


def _run_py(servers: Servers, tmp_path: Path, *extra: str,
            top_logprobs: int = VERIFIER_MAX_LOGPROBS) -> subprocess.CompletedProcess:
    """A small run.py as a user types it (no HYDRA_FULL_ERROR)."""
    env = {**os.environ, "PLANNER_API_BASE": servers.planner.api,
           "VERIFIER_API_BASE": servers.verifier.api, "EXECUTOR_API_BASE": servers.sam_url,
           "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'run'}",
           f"paths.cache_dir={tmp_path / 'cache'}", "experiment=http_synthetic", "seed=0",
           "dataset.num_samples=2", "max_n=2", "n_grid=[1,2]", "executor.prompt_mode=box",
           "planner.sampling.max_tokens=32", "verifier.sampling.max_tokens=16",
           f"verifier.top_logprobs={top_logprobs}", "selection.bootstrap=0", "logger=none",
           "pipeline.progress=false", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _preflight_problems(proc: subprocess.CompletedProcess) -> list[str]:
    """The lines under run.py's 'preflight failed' head; asserts it exited non-zero without a
    traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [x.strip() for x in proc.stderr.splitlines() if x.strip()]
    heads = [i for i, x in enumerate(lines) if "preflight failed" in x]
    assert heads, proc.stderr[-3000:]
    return lines[heads[-1] + 1:]


def test_run_py_preflight_stops_a_misconfigured_run_in_one_line_per_problem(
        servers: Servers, tmp_path: Path) -> None:
    """What would have cost a night and exited 0: top_logprobs above the verifier's
    --max-logprobs, more views than its --limit-mm-per-prompt, max_tokens past max_model_len.
    The real servers refuse the probe; run.py exits non-zero before any sample, one line per
    endpoint naming the limit and the fix."""
    problems = _preflight_problems(_run_py(
        servers, tmp_path / "logprobs", f"planner.sampling.max_tokens={MAX_MODEL_LEN - 8}",
        top_logprobs=VERIFIER_MAX_LOGPROBS + 1))
    assert len(problems) == 2, problems
    assert any(x.startswith("planner:") and "max_model_len" in x for x in problems), problems
    assert any(x.startswith("verifier:") and "logprobs" in x for x in problems), problems
    problems = _preflight_problems(_run_py(servers, tmp_path / "views",
                                           "verifier.overlay.views=[overlay,crop,image]"))
    assert len(problems) == 1 and problems[0].startswith("verifier:"), problems
    assert "--limit-mm-per-prompt" in problems[0] and "3 image" in problems[0], problems
    for sub in ("logprobs", "views"):
        assert not (tmp_path / sub / "run" / "records.jsonl").exists()
    # within the limits the same run goes through
    ok = _run_py(servers, tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr[-3000:]


def _clients(servers: Servers, samples: int, plan_tokens: int, verify_tokens: int):
    """The project's configs with the real clients on the servers: (cfg, the first synthetic
    sample, OpenAIPlanner, OpenAIVerifier)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    overrides = ["experiment=http_synthetic", f"dataset.num_samples={samples}",
                 f"planner.base_url={servers.planner.api}",
                 f"verifier.base_url={servers.verifier.api}",
                 "planner.structured_output=false", f"planner.sampling.max_tokens={plan_tokens}",
                 f"verifier.sampling.max_tokens={verify_tokens}",
                 "verifier.overlay.views=[overlay]",
                 f"verifier.top_logprobs={VERIFIER_MAX_LOGPROBS}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    ds = instantiate(cfg.dataset)
    return cfg, ds.load(ds.sample_ids()[0]), instantiate(cfg.planner), instantiate(cfg.verifier)


def test_real_clients_in_process_classify_every_reply(servers: Servers) -> None:
    """OpenAIPlanner and OpenAIVerifier, built from the project's configs, on many real replies:
    every hypothesis parses or is classified; every verdict carries finish_reason, a cut-off one
    is verify:truncated and unscored, a scored one lies in [0, 1]."""
    cfg, sample, planner, verifier = _clients(servers, 2, 64, 40)

    async def go():
        hyps = await planner.plan(sample, list(range(8)))
        h, w = sample.gt.shape
        masks = []
        for k in range(10):
            m = np.zeros((h, w), dtype=bool)
            m[8 * k: 8 * k + 40, 4 + 10 * k: 60 + 12 * k] = True
            masks.append(m)
        verdicts = await asyncio.gather(*(verifier.verify(sample, m) for m in masks))
        await planner.aclose()
        await verifier.aclose()
        return hyps, verdicts

    hyps, verdicts = asyncio.run(go())
    assert [x.index for x in hyps] == list(range(8))
    for x in hyps:  # free text (no grammar): noise, each failure classified
        assert x.valid or CODE.match(x.error or ""), x
        assert x.meta["seed"] == cfg.planner.base_seed + x.index
    for v in verdicts:
        assert v.meta["finish_reason"] in ("stop", "length"), v
        assert v.meta["reasoning_placement"] == "reasoning" or not v.reasoning, v
        if v.meta["finish_reason"] == "length":
            assert v.score is None and (v.error or "").startswith("verify:truncated"), v
        elif v.error is None:
            assert v.score is not None and 0.0 <= v.score <= 1.0, v
        else:
            assert v.score is None and CODE.match(v.error), v
    print(f"\nclients: {sum(x.valid for x in hyps)}/8 hypotheses valid; verdicts "
          f"{[(v.meta['finish_reason'], v.source or v.error.split()[0]) for v in verdicts]}")


def test_real_verifier_answers_the_arena_and_set_of_marks_calls(servers: Servers) -> None:
    """The pairwise and listwise verifier configs (issue 13) against the real thinking server:
    both candidates' overlays in one request (2 images), the numbered marks in one; every reply
    is scored in [0, 1] (a listwise one names a mark in range) or classified."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    def verifier(name: str):
        overrides = ["experiment=http_synthetic", "dataset.num_samples=1", f"verifier={name}",
                     f"verifier.base_url={servers.verifier.api}",
                     "verifier.sampling.max_tokens=40",
                     f"verifier.top_logprobs={VERIFIER_MAX_LOGPROBS}"]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        ds = instantiate(cfg.dataset)
        return instantiate(cfg.verifier), ds.load(ds.sample_ids()[0])

    pairwise, sample = verifier("qwen3vl_32b_thinking_pairwise")
    listwise, _ = verifier("qwen3vl_32b_thinking_listwise")
    h, w = sample.gt.shape
    ms = []
    for k in range(3):
        m = np.zeros((h, w), dtype=bool)
        m[10 * k: 10 * k + 40, 5 + 20 * k: 60 + 20 * k] = True
        ms.append(m)

    async def go():
        pairs = await asyncio.gather(*(pairwise.compare(sample, ms[a], ms[b])
                                       for a, b in ((0, 1), (1, 0), (1, 2))))
        chosen = await asyncio.gather(*(listwise.choose(sample, ms) for _ in range(3)))
        await pairwise.aclose()
        await listwise.aclose()
        return pairs, chosen

    pairs, chosen = asyncio.run(go())
    for v in [*pairs, *chosen]:
        assert v.meta["finish_reason"] in ("stop", "length"), v
        if v.meta["finish_reason"] == "length":
            assert v.score is None and (v.error or "").startswith("verify:truncated"), v
        elif v.error is None:
            assert v.score is not None and 0.0 <= v.score <= 1.0, v
        else:
            assert v.score is None and CODE.match(v.error), v
    for v in chosen:
        if v.ok:
            assert v.meta["choice"] in (0, 1, 2), v
    seen = [(v.meta["finish_reason"], v.source or v.error.split()[0]) for v in pairs + chosen]
    print(f"\narena/marks: {seen}")


# --- (b) wire facts the clients rely on -----------------------------------------------------


def test_models_lists_the_served_name_and_max_model_len(servers: Servers) -> None:
    for server in (servers.planner, servers.verifier):
        r = httpx.get(server.api + "/models", timeout=30)
        if os.environ.get("RESCUE_VLLM_CAPTURE") == "1" and server is servers.verifier:
            save("models", "GET /v1/models of the verifier server", server, "GET /v1/models",
                 None, r)
        (entry,) = r.json()["data"]
        assert entry["id"] == server.name and entry["max_model_len"] == MAX_MODEL_LEN


@pytest.mark.parametrize("structured", [False, True], ids=["free", "json_schema"])
def test_n_with_seed_gives_child_k_the_answer_of_a_lone_request_with_seed_plus_k(
        servers: Servers, structured: bool) -> None:
    fields = {**PLANNER_SAMPLING, "max_tokens": 24}
    if structured:
        fields["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "grounding", "schema": SCHEMA}}
    tag = "_json_schema" if structured else ""
    together = post(servers.planner, body(PLANNER, "Locate the red square as JSON.", n=4,
                                          seed=11, **fields),
                    f"planner_n4_seed11{tag}",
                    "planner, n=4 seed=11: child k must equal a lone request with seed 11+k")
    assert together.status_code == 200, together.text
    alone = []
    for k in range(4):
        r = post(servers.planner, body(PLANNER, "Locate the red square as JSON.", n=1,
                                       seed=11 + k, **fields),
                 f"planner_n1_seed12{tag}" if k == 1 else None,
                 "planner, n=1 seed=12: equals child 1 of the n=4 seed=11 request")
        assert r.status_code == 200, r.text
        alone += texts(r.json())
    assert texts(together.json()) == alone
    assert len(set(alone)) > 1  # the seeds do differ


def test_top_logprobs_list_the_sampled_token_first_and_end_with_eos(servers: Servers) -> None:
    r = post(servers.verifier, body(VERIFIER, "Is the square red? Answer yes or no.", n=1,
                                    seed=3, max_tokens=48, logprobs=True, top_logprobs=5,
                                    **VERIFIER_SAMPLING),
             "verifier_logprobs_top5",
             "thinking verifier behind --reasoning-parser deepseek_r1, logprobs top 5")
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"]  # reasoning tokens included
    for t in content:
        top = t["top_logprobs"]
        assert top[0]["token"] == t["token"] and top[0]["logprob"] == t["logprob"]
        assert len(top) in (5, 6)  # the sampled token, plus 5 when it is not among them
        rest = [a["logprob"] for a in top[1:]]
        assert rest == sorted(rest, reverse=True)
    if choice["finish_reason"] == "stop":
        assert content[-1]["token"] == EOS  # the EOS token is listed


def test_top_logprobs_under_a_grammar_may_hold_the_masked_sentinel(servers: Servers) -> None:
    r = post(servers.planner, body(PLANNER, "Locate the red square as JSON.", n=2, seed=5,
                                   max_tokens=32, logprobs=True,
                                   top_logprobs=PLANNER_MAX_LOGPROBS,
                                   response_format={"type": "json_schema", "json_schema": {
                                       "name": "grounding", "schema": SCHEMA}},
                                   **PLANNER_SAMPLING),
             "planner_json_schema_logprobs",
             "planner, json_schema response_format, logprobs top 5: -9999.0 marks tokens the "
             "grammar forbade")
    assert r.status_code == 200, r.text
    values = [a["logprob"] for c in r.json()["choices"] for t in c["logprobs"]["content"]
              for a in t["top_logprobs"]]
    assert values and all(v == MASKED or MASKED < v <= 0.0 for v in values)
    for c in r.json()["choices"]:
        assert c["message"]["content"].lstrip().startswith("[")  # the grammar held


def test_finish_reason_is_length_at_max_tokens_with_the_reasoning_unclosed(
        servers: Servers) -> None:
    cut = []
    for seed in range(8):  # a reply may also end by itself within max_tokens
        r = post(servers.verifier, body(VERIFIER, "Is the square red? Answer yes or no.", n=1,
                                        seed=seed, max_tokens=3, logprobs=True, top_logprobs=2,
                                        **VERIFIER_SAMPLING),
                 "verifier_truncated" if not cut else None,
                 "thinking verifier cut off at max_tokens=3: finish_reason length, the text "
                 "still in reasoning, content null")
        assert r.status_code == 200, r.text
        (choice,) = r.json()["choices"]
        if choice["finish_reason"] == "length":
            cut.append((r.json(), choice))
        else:
            assert choice["finish_reason"] == "stop"
    assert cut
    for resp, choice in cut:
        assert resp["usage"]["completion_tokens"] == 3
        tokens = "".join(t["token"] for t in choice["logprobs"]["content"])
        msg = choice["message"]
        if "</think>" not in tokens:  # the parser: all of it is reasoning, no content
            assert msg["content"] is None and msg["reasoning"], msg


def test_reasoning_arrives_in_message_reasoning_and_usage_details(servers: Servers) -> None:
    replies = []
    for seed in range(6):
        r = post(servers.verifier, body(VERIFIER, "Is the square red? Answer yes or no.",
                                        n=1, seed=seed, max_tokens=64, **VERIFIER_SAMPLING),
                 "verifier_reasoning" if seed == 1 else None,
                 "thinking verifier: message.reasoning holds the thinking, content the answer")
        assert r.status_code == 200, r.text
        replies.append(r.json())
    for j in replies:
        msg = j["choices"][0]["message"]
        assert "reasoning_content" not in msg  # vLLM 0.32: `reasoning` only
        assert isinstance(msg["reasoning"], str)
        assert msg["content"] is None or "<think>" not in msg["content"]
        details = j["usage"]["completion_tokens_details"]
        assert isinstance(details["reasoning_tokens"], int)
    assert any(j["choices"][0]["message"]["content"] for j in replies)  # some closed </think>
    planner = post(servers.planner, body(PLANNER, "Locate it.", n=1, seed=0, max_tokens=8,
                                         **PLANNER_SAMPLING)).json()
    assert planner["choices"][0]["message"]["reasoning"] is None  # no parser: all content
    assert planner["usage"]["completion_tokens_details"] is None


def test_past_a_server_limit_the_request_is_a_400_naming_it(servers: Servers) -> None:
    over = post(servers.planner, body(PLANNER, "Locate it.", max_tokens=2, logprobs=True,
                                      top_logprobs=PLANNER_MAX_LOGPROBS + 1),
                "error_top_logprobs_over_max_logprobs",
                f"top_logprobs {PLANNER_MAX_LOGPROBS + 1} against --max-logprobs "
                f"{PLANNER_MAX_LOGPROBS}: HTTP 400")
    assert over.status_code == 400, over.text
    err = over.json()["error"]
    assert "logprobs" in err["message"] and str(PLANNER_MAX_LOGPROBS) in err["message"]
    assert err["code"] == 400 and err["type"] == "BadRequestError"
    at_limit = post(servers.verifier, body(VERIFIER, "Is it red?", max_tokens=2,
                                           logprobs=True, top_logprobs=VERIFIER_MAX_LOGPROBS))
    assert at_limit.status_code == 200, at_limit.text
    images = post(servers.verifier, body(VERIFIER, "Is it red?", images=3, max_tokens=2),
                  "error_too_many_images",
                  "3 images against --limit-mm-per-prompt image 2: HTTP 400")
    assert images.status_code == 400 and "image" in images.json()["error"]["message"]
    long = post(servers.verifier, body(VERIFIER, "Is it red?", max_tokens=MAX_MODEL_LEN + 1))
    assert long.status_code == 400 and "max_model_len" in long.json()["error"]["message"]
    # prompt + max_tokens past max_model_len is not refused (the client's probe checks it)
    fits = post(servers.verifier, body(VERIFIER, "Is it red?", max_tokens=MAX_MODEL_LEN - 1,
                                       seed=0, **VERIFIER_SAMPLING))
    assert fits.status_code == 200, fits.text


def test_the_clients_record_the_real_usage_prompt_once_per_request(servers: Servers) -> None:
    """Issue 12: each answer's cost is vLLM's own `usage`: a planner request's prompt once (on
    its first child) and its completion total over the children; a verdict's tokens are exactly
    those of the same request sent raw (seeded, so the same reply)."""
    cfg, sample, planner, verifier = _clients(servers, 1, 24, 32)
    mask = np.zeros(sample.gt.shape, dtype=bool)
    mask[10:40, 10:50] = True

    async def go():
        hyps = await planner.plan(sample, list(range(4)))
        verdict = await verifier.verify(sample, mask)
        messages = await asyncio.to_thread(verifier.render, sample, mask)
        await planner.aclose()
        await verifier.aclose()
        return hyps, verdict, messages

    hyps, verdict, messages = asyncio.run(go())
    costs = [h.meta["cost"] for h in hyps]
    assert costs[0]["prompt_tokens"] > 0 and costs[0]["calls"] == 1
    assert all("prompt_tokens" not in c and "calls" not in c for c in costs[1:])
    assert 4 <= sum(c.get("completion_tokens", 0) for c in costs) <= 4 * 24
    raw = post(servers.verifier, {"model": cfg.verifier.model,
                                  **verifier.payload(messages)}).json()["usage"]
    got = verdict.meta["cost"]
    assert got["prompt_tokens"] == raw["prompt_tokens"]
    assert got["completion_tokens"] == raw["completion_tokens"]
    reasoning = (raw.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    assert got.get("reasoning_tokens", 0) == reasoning <= raw["completion_tokens"]
    assert got["calls"] == 1 and got["latency_s"] > 0
    print(f"\nusage: plan {costs}, verify {got}")
