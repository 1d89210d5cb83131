"""The two-step verdict (`verifier.logprobs_at: answer`) against in-stream logprobs on the real
thinking verifier (issue 16 item 2): the same masks and seeds scored both ways by the real
OpenAIVerifier, on the session's vLLM server (conftest.py). Run with

    .venv-vllm/bin/python -m pytest -m vllm tests/vllm/test_two_step_real_vllm.py

Sampling is the config's (temperature 0.6), seeded, not greedy: the tiny model's greedy reply
loops "yesno..." to max_tokens and is never scored. A seeded reply is what the comparison
needs: the same request gives the same reply, with or without logprobs (raw logprobs do not
steer sampling), so both modes read the same reasoning and answer.

What must hold, whatever the random model says:
- each verdict is scored in [0, 1] or classified; in-stream, a found answer token is scored
  from its logprobs; the two-step's first reply carries no logprobs and is the in-stream reply;
- where the answer has a verdict, the two-step asks one more request: a continuation of the
  assistant message (`continue_final_message`: its prompt is the first prompt followed by the
  prefix, not closed by `<|im_end|>`), one completion token, and its score is that token's
  logprobs; the verdict's cost counts both requests;
- at the same context (the continuation's prompt tokens are the in-stream prompt and generated
  tokens up to the answer token) the continuation lists the in-stream answer position's
  logprobs, and the score is the in-stream one.

The client's prefix renders the reasoning as Qwen3's thinking template does
(`<think>\\n…\\n</think>\\n\\n`); the real model writes that form itself, the tiny one does not
(`…yes</think>no`), so its two-step context, and score, differ from in-stream here: the same
context is checked with the reply's own text as prefix (where the server's tokenizer gives back
the generated tokens), and the client's prefix wherever it happens to match.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from typing import Any

import httpx
import numpy as np
import pytest
from vllm_harness import ROOT, VERIFIER_MAX_LOGPROBS, Servers

import rescue.models.chat as chat_module
import rescue.models.openai_verifier as verifier_module
from rescue.models.answers import THINK_START
from rescue.models.replies import Tokens, decode

pytestmark = pytest.mark.vllm

CODE = re.compile(r"^verify:[a-z_]+(\s|$)")
SEEDS = 12
IM_END = 151645  # <|im_end|>: closes a message the template rendered whole
BF16_STEP = 0.125
"""A bfloat16 logit's spacing in [16, 32), where the tiny model's listed logits lie (BIAS 15 +
log weight): a prefill and a decode computing one position differently would move a logit by
whole steps, and a logprob (logit minus a float32 logsumexp) by at most two."""
LOGPROB_TOL = 2 * BF16_STEP
SCORE_TOL = 0.25 * (math.exp(2 * LOGPROB_TOL) - 1)
"""p_yes / (p_yes + p_no) when every listed logprob moves by at most LOGPROB_TOL: its log-odds
move by at most twice that, the score by at most a quarter of exp of it minus one (0.16)."""


def _verifier(servers: Servers, at: str, *more: str):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    overrides = ["experiment=http_synthetic", "dataset.num_samples=1",
                 f"verifier.base_url={servers.verifier.api}", "verifier.sampling.max_tokens=48",
                 "verifier.overlay.views=[overlay]",
                 f"verifier.top_logprobs={VERIFIER_MAX_LOGPROBS}", f"verifier.logprobs_at={at}",
                 *more]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    ds = instantiate(cfg.dataset)
    return ds.load(ds.sample_ids()[0]), instantiate(cfg.verifier)


def _raw(servers: Servers, verifier, payload: dict[str, Any]) -> dict[str, Any]:
    """One request of the client's own payload, sent raw with vLLM's `return_token_ids`."""
    r = httpx.post(servers.verifier.api + "/chat/completions", timeout=600,
                   json={**verifier.chat.body(payload), "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()


def _listed(entry: dict[str, Any]) -> dict[str, float]:
    return {a["token"]: a["logprob"] for a in entry["top_logprobs"]}


def _at_context(verifier, g: dict[str, Any], j: int, resp: dict[str, Any]
                ) -> tuple[float, float] | None:
    """Where the continuation `resp` was asked at the context of the in-stream reply `g`'s
    token `j` (its prompt tokens are g's prompt and generated tokens before j): asserts that it
    lists the logprobs g lists at j, and the score they give; (max |d logprob|, |d score|, 0
    when the lists differ or hold no yes/no). None at another context."""
    if resp["prompt_token_ids"] != g["prompt_token_ids"] + g["choices"][0]["token_ids"][:j]:
        return None
    at = _listed(g["choices"][0]["logprobs"]["content"][j])
    got = _listed(resp["choices"][0]["logprobs"]["content"][0])
    common = set(at) & set(got)
    # each list is the top k, or its sampled token and the top k-1 when that is outside them
    assert len(common) >= VERIFIER_MAX_LOGPROBS - 2, (at, got)
    d_lp = max(abs(at[t] - got[t]) for t in common)
    assert d_lp <= LOGPROB_TOL, (at, got)
    if set(at) != set(got):
        return d_lp, 0.0
    ours = verifier._score_at(Tokens(g["choices"][0]["logprobs"]["content"]), j, {})
    theirs = verifier._score_at(Tokens(resp["choices"][0]["logprobs"]["content"]), 0, {})
    assert (ours is None) == (theirs is None), (at, got)
    d_score = 0.0 if ours is None else abs(ours - theirs)
    assert d_score <= SCORE_TOL, (ours, theirs)
    return d_lp, d_score


def _masks(shape: tuple[int, int]) -> list[np.ndarray]:
    h, w = shape
    out = []
    for k in range(6):
        m = np.zeros((h, w), dtype=bool)
        m[8 * k: 8 * k + 40, 4 + 10 * k: 60 + 12 * k] = True
        out.append(m)
    return out


def test_two_step_verdict_matches_in_stream_logprobs_on_the_real_verifier(
        servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    sample, stream = _verifier(servers, "stream")
    _, two = _verifier(servers, "answer")
    assert stream.logprobs_at == "stream" and two.logprobs_at == "answer"
    masks = _masks(sample.gt.shape)
    bodies: list[int] = []
    decode = chat_module.decode

    def counted(body, *args, **kwargs):
        bodies.append(len(body))
        return decode(body, *args, **kwargs)

    monkeypatch.setattr(chat_module, "decode", counted)

    async def go():
        rows = []
        for k in range(SEEDS):  # one request at a time: a batch of one, the same numerics
            stream.seed = two.seed = k
            messages = await asyncio.to_thread(stream.render, sample, masks[k % len(masks)])
            row: dict[str, Any] = {"seed": k, "messages": messages}
            for name, v in (("stream", stream), ("answer", two)):
                n0, c0 = len(bodies), time.process_time()
                verdict, replies = await v.ask("verify", messages)
                row[name] = (verdict, replies, time.process_time() - c0, bodies[n0:])
            rows.append(row)
        await stream.aclose()
        await two.aclose()
        return rows

    rows = asyncio.run(go())
    continued = same = 0
    worst_lp = worst_score = 0.0
    figures = {name: [] for name in ("stream", "answer")}
    for row in rows:
        messages = row["messages"]
        stream.seed = two.seed = row["seed"]  # the raw requests below resend the row's
        sv, (s_reply,), _, s_bytes = row["stream"]
        av, a_replies, _, a_bytes = row["answer"]
        for name, (v, replies, cpu, sizes) in (("stream", row["stream"]),
                                               ("answer", row["answer"])):
            assert v.meta["finish_reason"] in ("stop", "length"), v
            if v.meta["finish_reason"] == "length":
                assert v.score is None and v.error.startswith("verify:truncated"), v
            elif v.error is None:
                assert v.score is not None and 0.0 <= v.score <= 1.0, v
            else:
                assert v.score is None and CODE.match(v.error), v
            c = v.meta["cost"]
            assert c["calls"] == len(replies) == len(sizes)
            assert c["prompt_tokens"] == sum(r.prompt_tokens for r in replies)
            assert c["completion_tokens"] == sum(r.completion_tokens for r in replies)
            figures[name].append((c["prompt_tokens"], c["completion_tokens"], sum(sizes), cpu))
        # in-stream: logprobs on every generated token; a found answer token is read from them
        s_choice = s_reply.choices[0]
        s_tokens = s_choice.tokens()
        assert len(s_tokens) == s_reply.completion_tokens > 0
        if "answer_token" in sv.meta:
            assert sv.source == "logprobs", sv
        # two-step: the same reply (same seed), without logprobs, so a smaller body
        a_choice = a_replies[0].choices[0]
        assert not a_choice.tokens()
        assert (a_choice.message, a_choice.finish_reason) == (s_choice.message,
                                                              s_choice.finish_reason)
        assert a_replies[0].usage["completion_tokens"] == s_reply.completion_tokens
        assert a_bytes[0] < s_bytes[0]
        prefix = two.answer_prefix(a_choice) if a_choice.finish_reason == "stop" else None
        if prefix is None or two.read(a_choice).source != "parsed":
            assert len(a_replies) == 1 and av.meta.get("continuation") in (None,
                                                                           "no answer position")
            continue
        continued += 1
        assert len(a_replies) == 2, av
        cont = a_replies[1]
        assert cont.completion_tokens == 1 and cont.choices[0].finish_reason == "length"
        (tok,) = cont.choices[0].tokens()
        assert av.meta["continuation"] in ("read", "no usable logprobs"), av
        if av.meta["continuation"] == "read":
            assert av.source == "logprobs" and av.meta["answer_token"] == 0, av
            assert av.score == two._score_at([tok], 0, {})
        # the continuation continues the assistant message: the first prompt, then the prefix
        first = _raw(servers, two, two.payload(messages))
        again = _raw(servers, two, two.continuation(messages, prefix))
        p1, p2 = first["prompt_token_ids"], again["prompt_token_ids"]
        assert again["usage"]["prompt_tokens"] == cont.prompt_tokens == len(p2)
        assert p2[:len(p1)] == p1 and len(p2) > len(p1) and IM_END not in p2[len(p1):]
        assert _listed(again["choices"][0]["logprobs"]["content"][0]) == dict(
            (t, lp) for t, lp in tok.top)  # the client's request, answered the same again
        # where the client's prefix is the in-stream context, the in-stream score
        i = sv.meta.get("answer_token")
        if i is not None:
            g = _raw(servers, stream, stream.payload(messages))
            assert g["choices"][0]["message"]["content"] == s_choice.message.content
            met = _at_context(stream, g, i, again)
            if met is not None:
                same += 1
                worst_lp, worst_score = max(worst_lp, met[0]), max(worst_score, met[1])
    assert continued, "no reply held a verdict: the two-step was never asked"

    def mean(name: str, k: int) -> float:
        return sum(f[k] for f in figures[name]) / len(figures[name])

    print(f"\ntwo-step vs in-stream, {len(rows)} verdicts ({continued} continued, {same} of them "
          f"at the in-stream context: max |d logprob| {worst_lp:.2g}, max |d score| "
          f"{worst_score:.2g})")
    for name in figures:
        print(f"  {name}: tokens/verdict {mean(name, 0) + mean(name, 1):.1f} (prompt "
              f"{mean(name, 0):.1f} + completion {mean(name, 1):.1f}), body bytes/verdict "
              f"{mean(name, 2):.0f}, client CPU/verdict {mean(name, 3) * 1e3:.2f} ms")


def test_a_continuation_at_the_in_stream_context_lists_the_in_stream_logprobs(
        servers: Servers) -> None:
    """What the two-step relies on, at contexts the tiny model does reach: an in-stream reply's
    own text up to token j (the generation prompt's `<think>\\n` first) continued in one token
    lists the logprobs the reply listed at j, and gives the same score at its answer token.
    Only where the server's tokenizer gives the generated tokens back (BPE may merge across
    the sampled tokens' boundaries, ",yes"): the prompt token ids are compared."""
    sample, stream = _verifier(servers, "stream")
    masks = _masks(sample.gt.shape)
    met = scored = 0
    worst_lp = worst_score = 0.0
    for k in range(SEEDS):
        stream.seed = k
        messages = stream.render(sample, masks[k % len(masks)])
        g = _raw(servers, stream, stream.payload(messages))
        texts = [t["token"] for t in g["choices"][0]["logprobs"]["content"]]
        v = stream.read(decode(json.dumps(g)).choices[0])
        answer = v.meta.get("answer_token")
        for j in sorted({1, len(texts) // 2, *([answer] if answer is not None else [])}):
            if j >= len(texts):
                continue
            prefix = THINK_START + "\n" + "".join(texts[:j])
            got = _at_context(stream, g, j, _raw(servers, stream,
                                                 stream.continuation(messages, prefix)))
            if got is None:
                continue
            met += 1
            scored += j == answer
            worst_lp, worst_score = max(worst_lp, got[0]), max(worst_score, got[1])
    assert met, "no continuation met its in-stream context"
    print(f"\nin-stream contexts continued: {met} met ({scored} at the answer token), max "
          f"|d logprob| {worst_lp:.2g}, max |d score| {worst_score:.2g}")



def test_a_continuation_naming_its_images_by_uuid_reads_what_resending_them_reads(
        servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    """`verifier.continuation_images`: by uuid (the default), vLLM's processor cache serves the
    continuation's images, which it neither receives nor processes again; the verdict is the
    one `resend` gets. A uuid the server does not hold (renamed here, as after an eviction)
    gets vLLM's own 400, and the continuation is sent again with its images."""
    sample, named = _verifier(servers, "answer")
    _, resend = _verifier(servers, "answer", "verifier.continuation_images=resend")
    assert named.names.mode == "uuid" and resend.names.mode == "resend"
    masks = _masks(sample.gt.shape)
    sent: list[dict[str, Any]] = []
    body = chat_module.ChatEndpoint.body
    monkeypatch.setattr(chat_module.ChatEndpoint, "body",
                        lambda self, kwargs: sent.append(body(self, kwargs)) or sent[-1])

    async def verdicts(v, seeds):
        out = []
        for k in seeds:  # one request at a time: a batch of one, the same numerics
            v.seed = k
            messages = await asyncio.to_thread(v.render, sample, masks[k % len(masks)])
            n0 = len(sent)
            verdict, replies = await v.ask("verify", messages)
            out.append((verdict, replies, sent[n0:]))
        return out

    async def go():
        try:
            return (await verdicts(named, range(SEEDS)), await verdicts(resend, range(SEEDS)))
        finally:
            await named.aclose()
            await resend.aclose()

    # exact: a verdict's requests are the same tokens in every run (uuid or not), and a prompt
    # served from the prefix cache reuses the KV an identical prefill computed
    by_uuid, again = asyncio.run(go())
    continued = 0
    for (v, replies, bodies), (w, w_replies, w_bodies) in zip(by_uuid, again, strict=True):
        assert (v.score, v.source, v.error) == (w.score, w.source, w.error), (v, w)
        assert [r.prompt_tokens for r in replies] == [r.prompt_tokens for r in w_replies]
        assert "uuid" in json.dumps(bodies[0]) and "uuid" not in json.dumps(w_bodies)
        if len(replies) == 2:
            continued += 1
            assert len(bodies) == 2 and "data:image" not in json.dumps(bodies[1])
            assert "data:image" in json.dumps(w_bodies[1])
    assert continued and "images_by_uuid" not in named.stats()

    # a uuid vLLM never saw: its 400, then the continuation with its images, the same verdict
    by_uuid_images = verifier_module.images_by_uuid
    monkeypatch.setattr(verifier_module, "images_by_uuid", lambda messages: [
        {**m, "content": [{**p, "uuid": p["uuid"] + "-gone"} if "uuid" in p else p
                          for p in m["content"]]} if isinstance(m.get("content"), list) else m
        for m in by_uuid_images(messages)])
    _, missing = _verifier(servers, "answer")

    async def go_missing():
        try:
            return await verdicts(missing, range(SEEDS))
        finally:
            await missing.aclose()

    missed = asyncio.run(go_missing())
    for (v, replies, bodies), (w, _, _) in zip(missed, again, strict=True):
        assert (v.score, v.source, v.error) == (w.score, w.source, w.error), (v, w)
        if len(replies) == 2:  # the refused continuation, then the one that carried the images
            assert len(bodies) == 3 and "data:image" in json.dumps(bodies[2])
    assert missing.stats()["images_by_uuid"]["sent_again"] == {
        "continuation_cache_miss": continued}
    assert missing.names_images  # a cache miss is no reason to stop naming images
    print(f"\ncontinuations by uuid: {continued} of {SEEDS} verdicts continued, each the "
          f"verdict resending gets; {continued} unknown uuids resent after vLLM's cache miss")
