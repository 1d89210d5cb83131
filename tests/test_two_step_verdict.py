"""The two-step verdict (verifier.logprobs_at: answer): reasoning without logprobs, then one
token continuing the reply before its answer, with logprobs. Against the stand-in it gives the
in-stream score, sends no logprobs for the reasoning, and falls back to the parsed answer."""

from __future__ import annotations

import asyncio

import pytest
from standin import REASONING_PLACEMENTS, StandIn, VerifierScript, serve

from rescue.datasets.synthetic import SyntheticDataset
from rescue.models import answers
from rescue.models.openai_verifier import OpenAIVerifier, answer_offset, continuation_prefix

PROMPT = {"name": "t", "user": "{views}\nRequest: {query}\nyes or no?"}


@pytest.fixture(scope="module")
def sample():
    return SyntheticDataset(num_samples=1, seed=3, height=96, width=128).load(
        SyntheticDataset(num_samples=1, seed=3, height=96, width=128).sample_ids()[0])


def _both(script, sample, placement="reasoning", **kw):
    """(in-stream verdict, two-step verdict, the two-step run's request bodies)."""
    out, bodies = [], []
    for at in ("stream", "answer"):
        si = StandIn({"v": script}, reasoning_placement=placement)
        srv = serve(si)
        try:
            v = OpenAIVerifier("v", srv.url + "/v1", PROMPT, logprobs_at=at,
                               overlay={"views": ["overlay"]}, **kw)

            async def go(v=v):
                try:
                    return await v.verify(sample, sample.target)
                finally:
                    await v.aclose()

            out.append(asyncio.run(go()))
            bodies = si.chat_requests()
        finally:
            srv.stop()
    return out[0], out[1], bodies


@pytest.mark.parametrize("placement", REASONING_PLACEMENTS)
def test_two_step_gives_the_in_stream_score_without_logprobs_for_the_reasoning(sample,
                                                                               placement):
    stream, two, (first, second) = _both(VerifierScript(lambda r: 0.8), sample, placement)
    assert stream.source == two.source == "logprobs"
    assert two.score == pytest.approx(stream.score, abs=1e-9)
    assert two.meta["p_yes"] == pytest.approx(stream.meta["p_yes"], abs=1e-9)
    assert two.answer == stream.answer == "Yes" and two.reasoning == stream.reasoning
    assert not first.get("logprobs") and "top_logprobs" not in first
    assert second["continue_final_message"] is True and second["add_generation_prompt"] is False
    assert second["max_tokens"] == 1 and second["logprobs"] is True
    assert second["messages"][:-1] == first["messages"]
    prefix = second["messages"][-1]
    assert prefix["role"] == "assistant" and prefix["content"].endswith("</think>\n\n")
    assert two.meta["answer_token"] == 0 and two.meta["continuation"] == "read"
    # the cost counts both requests: the one-token continuation is one completion token more
    assert two.meta["cost"]["completion_tokens"] == stream.meta["cost"]["completion_tokens"] + 1


def test_the_prefix_stops_before_the_final_verdict_and_rating_digit(sample):
    script = VerifierScript(lambda r: 0.3, answer_template="After checking, my answer:\n{answer}")
    stream, two, (_, second) = _both(script, sample)
    assert second["messages"][-1]["content"].endswith("</think>\n\nAfter checking, my answer:\n")
    assert two.score == pytest.approx(stream.score, abs=1e-9) and two.answer.endswith("No")
    rating = VerifierScript(lambda r: 0.7, scale="rating")
    stream, two, (_, second) = _both(rating, sample, scale="rating")
    assert second["messages"][-1]["content"].endswith("</think>\n\n")
    assert two.score == pytest.approx(stream.score, abs=1e-9) and two.answer == "7/10"


def test_without_a_verdict_position_the_parsed_or_failed_answer_stands(sample):
    script = VerifierScript(lambda r: 0.5, answer_template="I cannot tell.")
    _, two, bodies = _both(script, sample)
    assert len(bodies) == 1 and not two.ok and two.error.startswith("verify:unparseable")


def test_prefix_and_offset_helpers():
    reply = answers.Reply("thinking", "So: **Yes**", "reasoning")
    at = answer_offset(reply.answer, "yes_no")
    assert reply.answer[at:].startswith("Yes")
    assert continuation_prefix(reply, at) == "<think>\nthinking\n</think>\n\nSo: **"
    spaced = answers.Reply("t", "So the answer is yes", "reasoning")
    assert continuation_prefix(spaced, answer_offset(spaced.answer, "yes_no")).endswith(" is")
    assert continuation_prefix(answers.Reply("", "Yes", "none"), 0) == ""
    assert answer_offset("rating 7/10", "rating") == 7 and answer_offset("none", "rating") is None
    v = OpenAIVerifier("v", "http://127.0.0.1:9/v1", PROMPT, logprobs_at="answer")
    assert v.identity()["logprobs_at"] == "answer"
    assert OpenAIVerifier("v", "http://127.0.0.1:9/v1", PROMPT).logprobs_at == "answer"
    stream = OpenAIVerifier("v", "http://127.0.0.1:9/v1", PROMPT, logprobs_at="stream")
    assert "logprobs_at" not in stream.identity()  # the keys verdicts were cached under
    with pytest.raises(ValueError, match="logprobs_at"):
        OpenAIVerifier("v", "http://127.0.0.1:9/v1", PROMPT, logprobs_at="later")


def test_the_continuation_drops_min_tokens_and_keeps_the_rest_of_the_sampling():
    v = OpenAIVerifier("v", "http://127.0.0.1:9/v1", PROMPT, logprobs_at="answer",
                       sampling={"max_tokens": 512, "extra": {"min_tokens": 64, "stop": ["x"]}})
    body = v.chat.body(v.continuation([{"role": "user", "content": "q"}], "<think>\nr"))
    assert "min_tokens" not in body and body["stop"] == ["x"] and body["max_tokens"] == 1
    assert v.chat.body(v.payload([]))["min_tokens"] == 64
