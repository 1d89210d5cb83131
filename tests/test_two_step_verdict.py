"""The two-step verdict (verifier.logprobs_at: answer): reasoning without logprobs, then one
token continuing the reply before its answer, with logprobs. Against the stand-in it gives the
in-stream score, sends no logprobs for the reasoning, and falls back to the parsed answer."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest
from standin import REASONING_PLACEMENTS, StandIn, VerifierScript, serve
from standin.server import MediaCache

from rescue.datasets.synthetic import SyntheticDataset
from rescue.models import answers
from rescue.models.http import EndpointError
from rescue.models.image_names import MISSES_CHECKED_AFTER, images_by_uuid, media_uuid, named_images
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
    (image,) = [p for p in first["messages"][0]["content"] if p["type"] == "image_url"]
    assert image["uuid"] == media_uuid(image["image_url"]["url"])  # named by its bytes
    assert second["messages"][:-1] == images_by_uuid(first["messages"])  # ... and named again
    assert "data:image" not in json.dumps(second)  # not sent twice
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


def _verdicts(sample, masks, media=None, at_once=False, **kw):
    """Two-step verdicts of `masks` in turn (or all `at_once`) on one stand-in (its `media`
    cache), the bodies and the verifier's stats."""
    si = StandIn({"v": VerifierScript(lambda r: 0.8)}, **({"media": media} if media else {}),
                 delay_s=0.3 if at_once else 0.0)  # answers together: all in flight at once
    srv = serve(si)
    try:
        v = OpenAIVerifier("v", srv.url + "/v1", PROMPT, overlay={"views": ["overlay"]}, **kw)

        async def go():
            try:
                if at_once:
                    return await asyncio.gather(*(v.verify(sample, m) for m in masks))
                return [await v.verify(sample, m) for m in masks]
            finally:
                await v.aclose()

        return asyncio.run(go()), si.chat_requests(), v.stats()
    finally:
        srv.stop()


def _box(sample):
    h, w = sample.target.shape
    box = sample.target & False
    box[h // 4: h // 2, w // 4: w // 2] = True
    return box


def _has_data(body):
    return "data:image" in json.dumps(body["messages"])


def test_resend_sends_the_images_again_and_names_none(sample):
    (named,), _, _ = _verdicts(sample, [sample.target])
    (resent,), (first, second), stats = _verdicts(sample, [sample.target],
                                                  continuation_images="resend")
    assert resent.score == pytest.approx(named.score, abs=1e-12) and resent.source == "logprobs"
    assert second["messages"][:-1] == first["messages"] and _has_data(second)
    assert "uuid" not in json.dumps(first) and "images_by_uuid" not in stats
    with pytest.raises(ValueError, match="continuation_images"):
        OpenAIVerifier("v", "http://127.0.0.1:9/v1", PROMPT, continuation_images="never")


def test_an_image_the_server_does_not_hold_is_sent_again_for_that_request_only(sample):
    (held,), _, _ = _verdicts(sample, [sample.target])
    other = _box(sample)
    (missed, later), bodies, stats = _verdicts(sample, [sample.target, other],
                                               media=MediaCache(api_servers=2))  # round-robin
    assert missed.score == pytest.approx(held.score, abs=1e-12) and missed.source == "logprobs"
    # per verdict: the reply, the continuation by uuid (refused: a 400, not recorded), resent
    assert [_has_data(b) for b in bodies] == [True, True, True, True]
    assert all("uuid" in json.dumps(b) for b in bodies)  # a cache miss keeps uuids on
    assert later.source == "logprobs"
    assert stats["images_by_uuid"] == {"on": True, "continuations": 2,
                                       "sent_again": {"continuation_cache_miss": 2}}
    assert stats["requests"] == 6 and stats["failures"] == 2  # the endpoint counts refusals


def test_a_server_refusing_images_by_uuid_turns_them_off_for_the_run(sample, caplog):
    other = _box(sample)
    with caplog.at_level(logging.WARNING, logger="rescue.models.image_names"):
        (first, second), bodies, stats = _verdicts(sample, [sample.target, other],
                                                   media=MediaCache(size=0))  # no processor cache
    assert first.source == second.source == "logprobs"
    assert stats["images_by_uuid"]["sent_again"] == {"continuation_refused": 1}
    assert not stats["images_by_uuid"]["on"] and stats["requests"] == 5
    assert "uuid" in json.dumps(bodies[0]) and "uuid" not in json.dumps(bodies[2:])
    assert sum("refused a continuation naming its images by uuid" in r.getMessage()
               for r in caplog.records) == 1


def test_only_data_urls_are_named():
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "https://example.org/a.jpg"}},
        {"type": "text", "text": "q"}]}]
    named = named_images(messages)
    data, http, _ = named[0]["content"]
    assert data["uuid"] == media_uuid("data:image/png;base64,AAAA") and "uuid" not in http
    assert images_by_uuid(named)[0]["content"][:2] == [
        {"type": "image_url", "image_url": None, "uuid": data["uuid"]}, http]
    assert media_uuid("data:a") != media_uuid("data:b") and messages[0]["content"][0].keys() == {
        "type", "image_url"}  # the caller's messages are left as they were


def _scripted(sample, fail, masks=None, **kw):
    """Two-step verdicts against the stand-in with `fail(body)` deciding, per request, an
    EndpointError to raise instead of sending it (or None): the verdicts or the error, the
    requests tried and the verifier."""
    si = StandIn({"v": VerifierScript(lambda r: 0.8)})
    srv = serve(si)
    tried = []
    try:
        v = OpenAIVerifier("v", srv.url + "/v1", PROMPT, overlay={"views": ["overlay"]}, **kw)
        create = v.chat.create

        async def scripted(what, **kwargs):
            tried.append(kwargs)
            exc = fail(kwargs)
            if exc is not None:
                raise exc
            return await create(what, **kwargs)

        v.chat.create = scripted

        async def go():
            try:
                return await asyncio.gather(*(v.verify(sample, m)
                                              for m in masks or [sample.target]))
            except EndpointError as exc:
                return exc
            finally:
                await v.aclose()

        return asyncio.run(go()), tried, v
    finally:
        srv.stop()


def _by_uuid(kwargs):
    return '"image_url": null' in json.dumps(kwargs)


def _named(kwargs):
    return '"uuid"' in json.dumps(kwargs)


@pytest.mark.parametrize("status", [408, 429, 503, None])
def test_a_busy_or_unreachable_server_is_no_reason_to_stop_naming_images(sample, status):
    busy = EndpointError("x", "overloaded", status=status, retryable=True)
    got, tried, v = _scripted(sample, lambda kw: busy if _by_uuid(kw) else None)
    assert got is busy and len(tried) == 2  # the error, not a resend with the images
    assert v.names.on and v.stats().get("images_by_uuid") is None


def test_a_continuation_refused_with_its_images_too_fails_with_that_refusal(sample):
    def fail(kwargs):
        return EndpointError("x", f"too long {_by_uuid(kwargs)}", status=400)

    got, tried, v = _scripted(sample, lambda kw: fail(kw) if kw.get(
        "extra_body", {}).get("continue_final_message") else None)
    assert isinstance(got, EndpointError) and "too long False" in str(got)  # the resend's
    assert len(tried) == 3 and v.names.on and not v.names.resent


def test_a_first_request_refused_for_its_uuids_goes_without_them(sample, caplog):
    strict = EndpointError("x", "Unrecognized key 'uuid' in messages[0].content[0]", status=400)
    masks = [sample.target, _box(sample)]
    with caplog.at_level(logging.WARNING, logger="rescue.models.image_names"):
        got, tried, v = _scripted(sample, lambda kw: strict if _named(kw) else None, masks)
    assert [g.source for g in got] == ["logprobs", "logprobs"]
    assert not v.names.on and v.names.resent == {"request_refused": 2}  # both were in flight
    # each first request named (both began before the refusal was known), then sent without
    assert sorted(_named(kw) for kw in tried) == [False] * 4 + [True] * 2
    assert sum("refused a request naming its images" in r.getMessage()
               for r in caplog.records) == 1


def test_many_continuations_refused_at_once_turn_naming_off_once(sample, caplog):
    masks = [sample.target, _box(sample), ~_box(sample)]
    with caplog.at_level(logging.WARNING, logger="rescue.models.image_names"):
        got, _, stats = _verdicts(sample, masks, media=MediaCache(size=0), at_once=True)
    assert [g.source for g in got] == ["logprobs"] * 3
    names = stats["images_by_uuid"]
    refused = names["sent_again"]["continuation_refused"]
    assert not names["on"] and refused == names["continuations"] == 3  # in flight together
    assert sum("refused a continuation" in r.getMessage() for r in caplog.records) == 1


def test_cache_misses_on_most_continuations_turn_naming_off(sample, caplog):
    h, w = sample.target.shape
    masks = []
    for k in range(MISSES_CHECKED_AFTER + 4):
        m = np.zeros((h, w), bool)
        m[k % (h // 2): k % (h // 2) + h // 3, 2 * k % (w // 2): 2 * k % (w // 2) + w // 3] = True
        masks.append(m)
    with caplog.at_level(logging.WARNING, logger="rescue.models.image_names"):
        got, _, stats = _verdicts(sample, masks, media=MediaCache(api_servers=2))
    assert {g.source for g in got} == {"logprobs"}
    names = stats["images_by_uuid"]
    assert not names["on"] and names["continuations"] == MISSES_CHECKED_AFTER
    assert names["sent_again"]["continuation_cache_miss"] > MISSES_CHECKED_AFTER // 2
    assert sum("missed its processor cache" in r.getMessage() for r in caplog.records) == 1


def test_a_verdicts_uuids_are_hashed_in_the_pool_with_its_views(sample, monkeypatch):
    from rescue.models import image_names

    def on_the_loop(url):
        raise AssertionError("a view hashed on the event loop")

    monkeypatch.setattr(image_names, "media_uuid", on_the_loop)  # what named_images would call
    (v,), (first, _), _ = _verdicts(sample, [sample.target])
    (image,) = [p for p in first["messages"][0]["content"] if p["type"] == "image_url"]
    assert v.source == "logprobs" and image["uuid"] == media_uuid(image["image_url"]["url"])
