"""The clients' own body decoder: the SDK's reading of vLLM's captured bodies, usage kept, and an
undecodable 200 retried as a transport failure."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from standin import ServerThread

from rescue.failures import TransportError
from rescue.models.openai_verifier import OpenAIVerifier
from rescue.models.replies import UndecodableReply, decode
from rescue.sample import Sample

CAPTURED = Path(__file__).parent / "fixtures" / "vllm_captured"
BODIES = sorted(p for p in CAPTURED.glob("*.json")
                if p.name.startswith(("planner", "verifier")))


def _body(path: Path) -> dict:
    return json.loads(path.read_text())["response"]["body"]


@pytest.mark.parametrize("path", BODIES, ids=lambda p: p.stem)
def test_the_decoder_reads_what_the_sdk_reads_from_captured_vllm_bodies(path):
    body = _body(path)
    ours = decode(json.dumps(body).encode())
    sdk = openai.types.chat.ChatCompletion.model_validate(body)
    assert len(ours.choices) == len(sdk.choices) > 0
    for a, b in zip(ours.choices, sdk.choices, strict=True):
        assert (a.index, a.finish_reason, a.message.content) == (b.index, b.finish_reason,
                                                                  b.message.content)
        assert a.message.reasoning == (b.message.model_extra or {}).get("reasoning")
        want = b.logprobs.content if b.logprobs else []
        got = a.tokens()
        assert got.texts == [t.token for t in want]
        for i in {0, len(want) // 2, len(want) - 1} if want else ():
            assert got[i].token == want[i].token and got[i].logprob == want[i].logprob
            assert got[i].top == tuple((t.token, t.logprob) for t in want[i].top_logprobs)
    assert ours.prompt_tokens == sdk.usage.prompt_tokens
    assert ours.completion_tokens == sdk.usage.completion_tokens
    details = sdk.usage.completion_tokens_details
    assert ours.reasoning_tokens == (details.reasoning_tokens if details else None)


@pytest.mark.parametrize("body", [b"", b"{not json", b"[1, 2]", b'{"choices": 3}',
                                  b'{"choices": ["x"]}', b'{"choices": [{"index": 0}]}',
                                  b'{"choices": [{"message": {"content": 7}}]}',
                                  b'{"choices": [{"message": null}]}'])
def test_a_body_that_is_no_chat_completion_is_a_transport_error(body):
    with pytest.raises(UndecodableReply) as err:
        decode(body)
    assert isinstance(err.value, TransportError) and err.value.retryable


def test_a_reply_must_hold_every_choice_asked_for():
    one = {"index": 0, "message": {"content": "a"}}
    two = {"index": 1, "message": {"content": None, "reasoning": "b"}}
    assert len(decode(json.dumps({"choices": [one, two]}), n=2).choices) == 2
    for choices in ([], [one], [one, one], [two]):
        with pytest.raises(UndecodableReply, match="for n=2"):
            decode(json.dumps({"choices": choices}), n=2)


def test_bad_model_text_in_a_well_formed_reply_is_an_answer_not_a_fault():
    """The envelope is the transport's; what the model wrote is judged by the readers."""
    body = json.dumps({"choices": [{"index": 0, "message": {"content": "{[ not a box"}}]})
    assert decode(body, n=1).choices[0].message.content == "{[ not a box"


def _flaky_app(bodies: list[bytes], seen: list[int]) -> FastAPI:
    """Answers /chat/completions with `bodies` in turn (200 each), the last one from then on."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        seen.append(1)
        return Response(bodies[min(len(seen), len(bodies)) - 1],
                        media_type="application/json")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"data": [{"id": "m"}]})

    return app


def _sample() -> Sample:
    img = np.full((32, 32, 3), 90, np.uint8)
    return Sample("s", "the thing", img, np.zeros((32, 32), np.uint8))


def _mask() -> np.ndarray:
    m = np.zeros((32, 32), bool)
    m[4:20, 4:20] = True
    return m


GOOD = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"content": "Yes.", "reasoning": "looks right"}}],
                   "usage": {"prompt_tokens": 7, "completion_tokens": 5,
                             "completion_tokens_details": {"reasoning_tokens": 3}}}).encode()


def test_an_undecodable_200_is_retried_and_the_usage_of_the_answer_is_kept():
    seen: list[int] = []
    with ServerThread(_flaky_app([b'{"choices": [', GOOD], seen)) as srv:
        v = OpenAIVerifier("m", srv.url + "/v1", "{query}?", logprobs=False,
                           retry={"attempts": 3, "base_delay_s": 0.01})

        async def go():
            reply = await v.chat.create("verify", **v.payload([{"role": "user",
                                                                "content": "q"}]))
            verdict = await v.verify(_sample(), _mask())
            await v.aclose()
            return reply, verdict

        reply, verdict = asyncio.run(go())
    assert (reply.prompt_tokens, reply.completion_tokens, reply.reasoning_tokens) == (7, 5, 3)
    assert verdict.score == 1.0 and verdict.source == "parsed"
    assert v.stats()["retries"] == 1 and len(seen) == 3


def test_a_server_that_never_answers_a_chat_completion_fails_as_transport():
    seen: list[int] = []
    with ServerThread(_flaky_app([b"<html>proxy error</html>"], seen)) as srv:
        v = OpenAIVerifier("m", srv.url + "/v1", "{query}?", logprobs=False,
                           retry={"attempts": 2, "base_delay_s": 0.01})

        async def go():
            try:
                return await v.verify(_sample(), _mask())
            finally:
                await v.aclose()

        with pytest.raises(TransportError, match="not JSON"):
            asyncio.run(go())
    assert len(seen) == 2
