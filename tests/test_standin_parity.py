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
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNg"
         "YGAAAAAEAAH2FzhVAAAAAElFTkSuQmCC")


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
    assert [a["logprob"] for a in first["top_logprobs"][2:]] == [-9999.0]


def test_message_and_choice_fields_as_vllm_sends_them(post):
    _, out = post({"messages": MSG, "max_tokens": 64})
    choice = out["choices"][0]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"
    usage = out["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_vllm_wording_of_refusals(post):
    status, out = post({"messages": MSG, "logprobs": True, "top_logprobs": 21})
    assert status == 400 and out["error"]["message"] == (
        "Requested sample logprobs of 21, which is greater than max allowed: 20 "
        "(parameter=logprobs, value=21)")
    status, out = post({"messages": MSG, "max_tokens": 5000}, max_model_len=4096)
    assert status == 400 and "maximum context length is 4096 tokens" in out["error"]["message"]


def _captured():
    return {p.stem: json.loads(p.read_text()) for p in sorted(CAPTURED.glob("*.json"))}


def test_same_keys_as_the_captured_vllm_responses(post):
    """Every captured chat response's keys (response, choice, message) are the stand-in's: a
    field vLLM sends that the stand-in lacks, or the reverse, fails here."""
    real = [c["response"]["body"] for c in _captured().values()
            if "choices" in c["response"]["body"]]
    assert len(real) >= 5
    _, ours = post({"messages": MSG, "logprobs": True, "top_logprobs": 2, "max_tokens": 64})
    for r in real:
        assert set(r) == set(ours)
        assert set(r["choices"][0]) == set(ours["choices"][0])
        assert set(r["choices"][0]["message"]) == set(ours["choices"][0]["message"])
        assert set(r["usage"]) == set(ours["usage"])


def test_captured_layout_holds_in_the_stand_in(post):
    """What the captures show, checked on both: the sampled token first even when another is
    likelier, EOS ending a finished reply's logprobs, -9999.0 under a grammar, None or an int
    as stop_reason."""
    cap = _captured()
    verifier = cap["verifier_logprobs_top5"]["response"]["body"]["choices"][0]
    first = verifier["logprobs"]["content"][0]
    assert first["top_logprobs"][0]["token"] == first["token"]
    assert max(a["logprob"] for a in first["top_logprobs"]) > first["logprob"]
    grammar = cap["planner_json_schema_logprobs"]["response"]["body"]["choices"][0]
    assert any(a["logprob"] == -9999.0 for t in grammar["logprobs"]["content"]
               for a in t["top_logprobs"])
    _, ours = post({"messages": MSG, "n": 2, "max_tokens": 64})
    assert [c["stop_reason"] for c in ours["choices"]] == [None, 151643]
    for c in [c["response"]["body"]["choices"][0] for c in cap.values()
              if "choices" in c["response"]["body"]]:
        assert c["stop_reason"] is None or isinstance(c["stop_reason"], int)


@pytest.mark.parametrize(("name", "body", "kw"), [
    ("error_top_logprobs_over_max_logprobs", {"logprobs": True, "top_logprobs": 6},
     {"max_logprobs": 5}),
    ("error_too_many_images", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": PIXEL}}] * 3 + [
        {"type": "text", "text": "Is it red?"}]}], "max_tokens": 2}, {"max_images": 2}),
])
def test_refusals_word_for_word_as_captured(post, name, body, kw):
    real = _captured()[name]["response"]
    status, ours = post({"messages": MSG, **body}, **kw)
    assert status == real["status"] == 400
    assert ours["error"] == real["body"]["error"]
