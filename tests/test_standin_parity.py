"""The stand-in answers in vLLM's own layout (issue 8, "The stand-in differs from vLLM"), on the
raw JSON, so a client test passing against it means something against the real server. Each
property below was seen on vLLM 0.32 serving Qwen3-VL; where the real-vLLM tier saved a
captured response (tests/fixtures/vllm_captured/), the stand-in's keys are compared with it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from standin import Completion, ServerThread, StandIn

MODEL = "m"
CAPTURED = Path(__file__).parent / "fixtures" / "vllm_captured"


def _policy(text="no, so: yes", reasoning="There is no other object.", finish="stop"):
    def answer(req):
        return [Completion(text=text, reasoning=reasoning, answer_token=" yes",
                           answer_dist={" yes": 0.3, " no": 0.6, " maybe": 0.1},
                           finish_reason=finish) for _ in range(req.n)]
    return answer


@pytest.fixture
def post():
    servers = []

    def send(body, policy=None, **kw):
        si = StandIn({MODEL: policy or _policy()}, **kw)
        srv = ServerThread(si.app()).start()
        servers.append(srv)
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": MODEL, **body},
                       timeout=30)
        return r.status_code, r.json()

    yield send
    for s in servers:
        s.stop()


MSG = [{"role": "user", "content": "is it?"}]


def test_sampled_token_first_then_the_others_by_rank(post):
    _, out = post({"messages": MSG, "logprobs": True, "top_logprobs": 3, "max_tokens": 64})
    content = out["choices"][0]["logprobs"]["content"]
    answer = next(t for t in content if t["token"] == " yes")
    tops = [a["token"] for a in answer["top_logprobs"]]
    assert tops == [" yes", " no", " maybe"]  # sampled " yes" first although " no" is likelier
    assert answer["top_logprobs"][0]["logprob"] == answer["logprob"]


def test_eos_token_ends_the_logprobs_of_a_finished_reply_only(post):
    _, out = post({"messages": MSG, "logprobs": True, "top_logprobs": 1, "max_tokens": 64})
    assert out["choices"][0]["logprobs"]["content"][-1]["token"] == "<|im_end|>"
    assert "<|im_end|>" not in out["choices"][0]["message"]["content"]
    _, cut = post({"messages": MSG, "logprobs": True, "top_logprobs": 1, "max_tokens": 64},
                  policy=_policy(finish="length"))
    assert cut["choices"][0]["logprobs"]["content"][-1]["token"] != "<|im_end|>"
    assert cut["choices"][0]["stop_reason"] is None


def test_grammar_masked_alternatives_are_minus_9999(post):
    body = {"messages": MSG, "logprobs": True, "top_logprobs": 3, "max_tokens": 64,
            "response_format": {"type": "json_schema", "json_schema": {"name": "g",
                                                                      "schema": {}}}}
    _, out = post(body, policy=_policy(reasoning=None))
    first = out["choices"][0]["logprobs"]["content"][0]
    assert [a["logprob"] for a in first["top_logprobs"][1:]] == [-9999.0, -9999.0]


def test_message_and_choice_fields_as_vllm_sends_them(post):
    _, out = post({"messages": MSG, "max_tokens": 64})
    choice = out["choices"][0]
    assert "tool_calls" not in choice["message"]
    assert isinstance(choice["stop_reason"], int) and choice["finish_reason"] == "stop"
    usage = out["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_vllm_wording_of_refusals(post):
    status, out = post({"messages": MSG, "logprobs": True, "top_logprobs": 21})
    assert status == 400 and out["error"]["message"] == (
        "Requested sample logprobs of 21, which is greater than max allowed: 20")
    status, out = post({"messages": MSG, "max_tokens": 5000}, max_model_len=4096)
    assert status == 400 and "maximum context length is 4096 tokens" in out["error"]["message"]


@pytest.mark.skipif(not CAPTURED.is_dir(), reason="no captured vLLM responses in this checkout")
def test_same_keys_as_a_captured_vllm_response(post):
    """Every captured chat response's keys (response, choice, message, usage) are the
    stand-in's: a field vLLM sends that the stand-in lacks, or the reverse, fails here."""
    pairs = sorted(CAPTURED.glob("*.json"))
    real = [json.loads(p.read_text()) for p in pairs]
    real = [r.get("response", r) for r in real if "choices" in r.get("response", r)]
    assert real, f"no chat responses among {[p.name for p in pairs]}"
    _, ours = post({"messages": MSG, "logprobs": True, "top_logprobs": 2, "max_tokens": 64})
    for r in real:
        assert set(r) == set(ours)
        assert set(r["choices"][0]) == set(ours["choices"][0])
        assert set(r["choices"][0]["message"]) - {"reasoning", "reasoning_content"} == \
            set(ours["choices"][0]["message"]) - {"reasoning", "reasoning_content"}
