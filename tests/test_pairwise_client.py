"""The real verifier client's pairwise call: P(candidate 1) from the answer digit's logprobs
(renormalised over 1 and 2), else the parsed number; both candidates' views in one message."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace as NS

import numpy as np
import pytest

from rescue.models.openai_verifier import OpenAIVerifier
from rescue.sample import Sample


def _verifier(**kw):
    kw = {"call_shape": "pairwise", "scale": "choice", **kw}
    return OpenAIVerifier("m", "http://127.0.0.1:9/v1", "{views} Q: {query}", **kw)


def _tok(token, p=0.9, alts=()):
    lp = math.log(p)
    top = [NS(token=token, logprob=lp)] + [NS(token=t, logprob=a) for t, a in alts]
    return NS(token=token, logprob=lp, top_logprobs=top)


def _choice(tokens, finish="stop"):
    text = "".join(t.token for t in tokens)
    msg = NS(content=text, reasoning=None, model_extra={})
    return NS(message=msg, finish_reason=finish, logprobs=NS(content=tokens), index=0)


def test_the_answer_digit_gives_p_first_over_both_options():
    toks = [_tok("<think>", 0.99), _tok("hm", 0.99), _tok("</think>", 0.99),
            _tok("2", 0.6, [("1", math.log(0.2)), ("3", math.log(0.2))])]
    v = _verifier().read(_choice(toks))
    assert v.source == "logprobs" and v.score == pytest.approx(0.2 / 0.8)


def test_without_logprobs_the_last_option_named_is_read():
    v = _verifier(logprobs=False).read(NS(message=NS(content="</think>Candidate 1 is worse, "
                                                     "so 2", reasoning=None, model_extra={}),
                                         finish_reason="stop", logprobs=None, index=0))
    assert v.source == "parsed" and v.score == 0.0
    bad = _verifier(logprobs=False).read(NS(message=NS(content="</think>neither",
                                                       reasoning=None, model_extra={}),
                                            finish_reason="stop", logprobs=None, index=0))
    assert bad.score is None and bad.error.startswith("verify:unparseable")


def test_a_pairwise_config_must_answer_by_choice():
    with pytest.raises(ValueError, match="pairwise or listwise answers scale choice"):
        OpenAIVerifier("m", "http://127.0.0.1:9/v1", "Q: {query}", call_shape="pairwise")
    assert "call_shape" not in OpenAIVerifier("m", "http://x/v1", "Q: {query}").identity()
    assert _verifier().identity()["call_shape"] == "pairwise"


def test_one_message_carries_both_candidates_views_in_order():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    gt = np.zeros((40, 50), np.uint8)
    sample = Sample("s", "the thing", img, gt)
    a = np.zeros((40, 50), bool)
    a[5:15, 5:15] = True
    b = np.zeros((40, 50), bool)
    b[20:30, 30:45] = True
    v = _verifier(overlay={"views": ["overlay", "crop"]})
    sent = {}

    async def create(stage, **kw):
        sent.update(stage=stage, **kw)
        return NS(choices=[_choice([_tok("1", 0.9, [("2", math.log(0.1))])])])

    v.chat.create = create
    out = asyncio.run(v.compare(sample, a, b))
    assert out.score == pytest.approx(0.9)
    content = sent["messages"][-1]["content"]
    assert sent["stage"] == "compare"
    assert sum(part["type"] == "image_url" for part in content) == 4
    text = content[-1]["text"]
    assert "Images 1-2 show candidate 1" in text and "Images 3-4 show candidate 2" in text


def test_the_listwise_call_sends_one_numbered_image_and_reads_the_likeliest_mark():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    sample = Sample("s", "the thing", img, np.zeros((40, 50), np.uint8))
    shown = []
    for y in (2, 14, 26):
        m = np.zeros((40, 50), bool)
        m[y:y + 10, 5:30] = True
        shown.append(m)
    v = OpenAIVerifier("m", "http://127.0.0.1:9/v1", "{views} Q: {query} 1..{max}",
                       call_shape="listwise", scale="choice", top_k=3)
    sent = {}

    async def create(stage, **kw):
        sent.update(stage=stage, **kw)
        return NS(choices=[_choice([_tok("3", 0.5, [("1", math.log(0.3)),
                                                     ("2", math.log(0.2))])])])

    v.chat.create = create
    out = asyncio.run(v.choose(sample, shown))
    assert out.meta["choice"] == 2 and out.score == pytest.approx(0.5)
    content = sent["messages"][-1]["content"]
    assert sent["stage"] == "choose"
    assert sum(part["type"] == "image_url" for part in content) == 1
    assert "3 candidate regions" in content[-1]["text"] and "1..3" in content[-1]["text"]
    parsed = v.read(NS(message=NS(content="</think>Region 2", reasoning=None, model_extra={}),
                       finish_reason="stop", logprobs=None, index=0), options=3)
    assert parsed.meta["choice"] == 1 and parsed.ok
