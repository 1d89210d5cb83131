"""Verifier client: a (thinking) VLM behind vLLM's OpenAI API judges one candidate mask.

The mask is drawn over the image (`overlay`), the model is asked a yes/no question (or, with
`scale: rating`, for a 0..rating_max rating), and the score comes from the answer token's
`top_logprobs` (see `answers`); when no usable logprobs arrive the final answer text is parsed
instead. The reasoning text is kept in the Verdict, so the cache holds it for analysis.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from rescue import cost
from rescue.models import answers
from rescue.models.chat import ChatEndpoint, ImageEncoding, PromptTemplate, Sampling
from rescue.models.http import EndpointError, RetryPolicy
from rescue.models.image_names import (
    ImageNames,
    images_by_uuid,
    media_uuid,
    named_images,
    refused,
)
from rescue.models.replies import ChatReply, Choice, summed_usage
from rescue.models.views import (
    OverlayStyle,
    describe,
    describe_candidates,
    describe_marks,
    draw_marks,
    render_views,
    serial_opencv,
)
from rescue.models.workers import INLINE_SIZE, Memo, WorkerPool
from rescue.protocols import Verdict
from rescue.sample import Sample
from rescue.text import first_unencodable, replaced

SCALES = ("yes_no", "rating", "choice")
CALL_SHAPES = ("pointwise", "pairwise", "listwise")
LOGPROBS_AT = ("stream", "answer")
"""Where the score's logprobs come from: `stream` asks for them on every generated token
(reasoning included) and finds the answer token; `answer` (the default) generates without
them, then asks for one token continuing the reply up to its answer (vLLM's
continue_final_message; the prompt and reasoning are in the prefix cache), so the answer's
position is known by construction and the reply carries no logprobs for the reasoning. On the
real-vLLM tier (benchmarks/bench_verdict_logprobs.py, 300-token replies, top-20; 2026-12-07)
that is 184x fewer response bytes, 4.4x less client CPU and 2.4x less API-server CPU a
verdict, for 23% more tokens (the continuation's prompt, mostly served by the prefix cache).
Only a reply whose text has a verdict is continued: in-stream also scores a verdict token it
finds in the token stream where the text parser finds none (on the tiny random model's noise;
a real thinking model's text and tokens agree). `stream` keeps the identity (cache keys) of
verdicts cached before the default changed."""


def answer_offset(answer: str, scale: str) -> int | None:
    """Where the answer's verdict starts in its text: the final yes/no, else the number it
    gives (labelled, else its first digit); None when there is none or it is ambiguous."""
    if scale == "yes_no":
        return answers.verdict_offset(answer)
    return answers.final_number(answer).offset


def continuation_prefix(reply: answers.Reply, at: int) -> str:
    """The assistant message a continuation starts from: the reasoning inside the think tags
    as Qwen3 thinking templates render it, then the answer up to its verdict. Trailing spaces
    are left to the next token (BPE writes " yes" as one token); newlines stay, as the model
    generated them."""
    head = reply.answer[:at].rstrip(" ")
    if reply.placement == "none":
        return head
    return f"{answers.THINK_START}\n{reply.reasoning}\n{answers.THINK_END}\n\n{head}"


def _size(choice: Any) -> int:
    """`replies.Choice.size`; a choice that does not measure itself (a test's fake) counts as
    long, so it is read in the pool as before."""
    return int(getattr(choice, "size", INLINE_SIZE + 1))


def _digest(a: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).data, digest_size=16).digest()


def _token_logprobs(choice: Any) -> Sequence[answers.TokenLogprob]:
    """The generated tokens of a choice: decoded lazily from our own `replies.Choice`, or
    built from an SDK-shaped object (tests, re-scoring)."""
    if isinstance(choice, Choice):
        return choice.tokens()
    content = getattr(getattr(choice, "logprobs", None), "content", None) or []
    out = []
    for t in content:
        top = tuple((str(a.token), float(a.logprob)) for a in (t.top_logprobs or []))
        out.append(answers.TokenLogprob(str(t.token), float(t.logprob), top))
    return out


class OpenAIVerifier:
    """Verifier over an OpenAI-compatible chat endpoint (vLLM serving Qwen3-VL-Thinking)."""

    simulated = False

    def __init__(self, model: str, base_url: str, prompt: Mapping[str, Any] | str, *,
                 api_key: str | None = "EMPTY", timeout_s: float = 600.0,
                 max_concurrency: int = 16, sampling: Mapping[str, Any] | None = None,
                 seed: int = 0, logprobs: bool = True, top_logprobs: int = 20,
                 scale: str = "yes_no", rating_max: int = 10,
                 overlay: Mapping[str, Any] | None = None, image: Mapping[str, Any] | None = None,
                 empty_mask_score: float | None = 0.0,
                 retry: Mapping[str, Any] | RetryPolicy | None = None,
                 preflight_timeout_s: float = 10.0, call_shape: str = "pointwise",
                 top_k: int = 4, workers: int | None = None, view_memo: int = 256,
                 logprobs_at: str = "answer", continuation_images: str = "uuid"):
        if scale not in SCALES:
            raise ValueError(f"verifier.scale must be one of {SCALES}, got {scale!r}")
        if call_shape not in CALL_SHAPES:
            raise ValueError(f"verifier.call_shape must be one of {CALL_SHAPES}, got "
                             f"{call_shape!r}")
        if (call_shape != "pointwise") != (scale == "choice"):
            raise ValueError("verifier.call_shape pairwise or listwise answers scale choice (a "
                             f"number), and only they do; got call_shape {call_shape!r}, scale "
                             f"{scale!r}")
        if not 2 <= int(top_k) <= 9:
            raise ValueError(f"verifier.top_k must be in 2..9 (one digit a mark), got {top_k}")
        self.call_shape, self.top_k = call_shape, int(top_k)
        if logprobs_at not in LOGPROBS_AT:
            raise ValueError(f"verifier.logprobs_at must be one of {LOGPROBS_AT}, got "
                             f"{logprobs_at!r}")
        self.logprobs_at = logprobs_at if logprobs else "stream"
        self.names = ImageNames(continuation_images, base_url)  # validates it, before any pool
        if logprobs and not 1 <= int(top_logprobs) <= 20:
            raise ValueError("verifier.top_logprobs must be in 1..20 (vLLM's default "
                             f"--max-logprobs is 20), got {top_logprobs}")
        if rating_max < 1:
            raise ValueError(f"verifier.rating_max must be >= 1, got {rating_max}")
        self.model = model
        self.template = PromptTemplate.from_config(prompt, required=("query",))
        self.sampling = Sampling.from_config(sampling)
        self.seed = int(seed)
        self.logprobs = bool(logprobs)
        self.top_logprobs = int(top_logprobs)
        self.scale = scale
        self.rating_max = int(rating_max)
        self.overlay = OverlayStyle.from_config(overlay)
        self.image = ImageEncoding.from_config(image)
        self.empty_mask_score = None if empty_mask_score is None else float(empty_mask_score)
        self.chat = ChatEndpoint("verifier", model, base_url, api_key=api_key,
                                 timeout_s=timeout_s, max_concurrency=max_concurrency,
                                 retry=retry, preflight_timeout_s=preflight_timeout_s)
        self.pool = WorkerPool("verifier-work", workers, initializer=serial_opencv)
        self._views: Memo[tuple[Any, ...], tuple[tuple[str, ...], tuple[str, ...]]] = Memo(
            view_memo)  # a mask's view URLs and, while images are named, their uuids

    @property
    def base_url(self) -> str:
        return self.chat.base_url

    def identity(self) -> Mapping[str, Any]:
        return {
            "kind": "openai_chat_verifier",
            "model": self.model,
            "prompt": self.template.to_json(),
            "sampling": self.sampling.to_json(),
            "seed": self.seed,
            "logprobs": self.top_logprobs if self.logprobs else None,
            "scale": self.scale,
            "rating_max": self.rating_max if self.scale == "rating" else None,
            "overlay": self.overlay.to_json(),
            "image": self.image.to_json(),
            "empty_mask_score": self.empty_mask_score,
            **({"call_shape": self.call_shape} if self.call_shape != "pointwise" else {}),
            **({"top_k": self.top_k} if self.call_shape == "listwise" else {}),
            **({"logprobs_at": self.logprobs_at} if self.logprobs_at != "stream" else {}),
        }

    def _prompt_fields(self, sample: Sample) -> dict[str, str]:
        return {"query": sample.query,
                "views": describe(self.overlay.views, self.overlay.color_name),
                "max": str(self.rating_max)}

    def view_urls(self, image: np.ndarray, mask: np.ndarray) -> tuple[str, ...]:
        """One candidate's views, drawn and encoded (pure, CPU-heavy: run in `self.pool`)."""
        return tuple(self.image.data_url(img) for _, img in
                     render_views(image, mask, self.overlay))

    async def views(self, sample: Sample, mask: np.ndarray) -> tuple[str, ...]:
        """`view_urls` of a mask, drawn in the worker pool once per (image, mask) however many
        calls show it."""
        return (await self.named_views(sample, mask))[0]

    async def named_views(self, sample: Sample, mask: np.ndarray
                          ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """`views`, and their uuids while images are named (`named_images`): both computed in
        the pool, so no view's bytes are hashed on the event loop."""
        m = np.asarray(mask, bool)
        key = (sample.sample_id, sample.image_sha256, _digest(np.packbits(m)), m.shape)
        got = self._views.get(key)
        if got is None:
            got = await self.pool.run(self._named_views, sample.image, m, self.names_images)
            self._views.put(key, got)
        return got

    def _named_views(self, image: np.ndarray, mask: np.ndarray, named: bool
                     ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """`view_urls`, and their `media_uuid`s where images are `named` (in the pool too)."""
        urls = self.view_urls(image, mask)
        return urls, (tuple(media_uuid(u) for u in urls) if named else ())

    @property
    def names_images(self) -> bool:
        """Whether requests give their images uuids now: two-step verdicts continued by uuid
        (`rescue.models.image_names`), until the server shows it takes none."""
        return self.logprobs_at == "answer" and self.names.on

    def render(self, sample: Sample, mask: np.ndarray) -> list[dict[str, Any]]:
        """The chat messages for one candidate (overlay drawn, images encoded)."""
        return self._messages(sample, self.view_urls(sample.image, np.asarray(mask, bool)))

    def _messages(self, sample: Sample, urls: tuple[str, ...]) -> list[dict[str, Any]]:
        return self.template.messages(list(urls), **self._prompt_fields(sample))

    def _pair_messages(self, sample: Sample, urls: tuple[str, ...]) -> list[dict[str, Any]]:
        return self.template.messages(list(urls), query=sample.query, max="2",
                                      views=describe_candidates(self.overlay.views, 2,
                                                                self.overlay.color_name))

    def render_pair(self, sample: Sample, first: np.ndarray,
                    second: np.ndarray) -> list[dict[str, Any]]:
        """The chat messages of one arena comparison: the views of candidate 1, then of 2."""
        return self._pair_messages(sample, self.view_urls(sample.image, first)
                                   + self.view_urls(sample.image, second))

    async def compare(self, sample: Sample, first: np.ndarray, second: np.ndarray) -> Verdict:
        """P(candidate 1 is the better answer), from the digit's logprobs or the parsed answer;
        raises EndpointError only for transport failures."""
        (urls1, uuids1), (urls2, uuids2) = (await self.named_views(sample, first),
                                            await self.named_views(sample, second))
        return (await self.ask("compare", self._pair_messages(sample, urls1 + urls2),
                               uuids=uuids1 + uuids2 if uuids1 and uuids2 else ()))[0]

    def render_marks(self, sample: Sample, shown: list[np.ndarray]) -> list[dict[str, Any]]:
        """The chat messages of one Set-of-Marks call: one image, the masks numbered 1..k."""
        url = self.image.data_url(draw_marks(sample.image, shown, self.overlay))
        return self.template.messages([url], query=sample.query, max=str(len(shown)),
                                      views=describe_marks(len(shown)))

    async def choose(self, sample: Sample, shown: list[np.ndarray]) -> Verdict:
        """The mask named best among `shown` (meta `choice`, 0-based; `score` its
        probability), from the digit's logprobs or the parsed answer."""
        ms = [np.asarray(m, bool) for m in shown]
        messages = await self.pool.run(self.render_marks, sample, ms)
        return (await self.ask("choose", messages, len(ms)))[0]

    async def verify(self, sample: Sample, mask: np.ndarray) -> Verdict:
        """Score one candidate mask; raises EndpointError only for transport failures."""
        m = np.asarray(mask, dtype=bool)
        if self.empty_mask_score is not None and not m.any():
            return Verdict(score=self.empty_mask_score, answer="", source="rule",
                           meta={"rule": "empty_mask"})
        urls, uuids = await self.named_views(sample, m)
        return (await self.ask("verify", self._messages(sample, urls), uuids=uuids))[0]

    async def ask(self, what: str, messages: list[dict[str, Any]], options: int = 2,
                  uuids: Sequence[str] = ()) -> tuple[Verdict, list[ChatReply]]:
        """One judgement: the Verdict (its cost in meta) and the replies it took (one, or two
        with `logprobs_at: answer`; none for messages UTF-8 cannot carry, `verify:bad_text`);
        raises EndpointError only for transport failures. `uuids`: the images' (`named_views`),
        in their order; hashed here where not given."""
        why = first_unencodable(messages)
        if why is not None:  # not sent, and permanent: the same text fails on every rerun
            return Verdict(score=None, source="", error=f"verify:bad_text {why}"), []
        t0 = time.perf_counter()
        named = self.names_images
        sent = named_images(messages, uuids) if named else messages
        try:
            resp = await self.chat.create(what, **self.payload(sent))
        except EndpointError as exc:
            if not (named and refused(exc)):
                raise
            resp = await self.chat.create(what, **self.payload(messages))  # without uuids
            self.names.sent_again(exc, "request")
            sent, named = messages, False
        replies = [resp]
        if not resp.choices:
            v = Verdict(score=None, source="", error="verify:no_choice server returned none")
        else:  # untrusted text: a long (or hostile) one is parsed in the pool
            choice = resp.choices[0]
            v = await self.pool.parse(_size(choice), self.read, choice, options)
            if self.logprobs_at == "answer" and v.source == "parsed":
                v = await self._continue(what, sent, choice, v, options, replies, named)
        usage = cost.Usage.of({"usage": summed_usage(replies)})
        spent = cost.request_costs(usage, [None], [0], time.perf_counter() - t0)[0]
        spent = replace(spent, calls=len(replies))  # a continued two-step verdict made two
        return replace(v, meta=cost.with_cost(v.meta, spent)), replies

    async def _continue(self, what: str, messages: list[dict[str, Any]], choice: Any,
                        parsed: Verdict, options: int, replies: list[ChatReply],
                        named: bool) -> Verdict:
        """`parsed` scored from the logprobs of one token continuing its reply just before the
        answer; `parsed` itself (meta `continuation` says why) when that cannot be read."""
        prefix = await self.pool.parse(_size(choice), self.answer_prefix, choice)
        if prefix is None:
            return replace(parsed, meta={**parsed.meta, "continuation": "no answer position"})
        resp = await self._continuation_reply(what, messages, prefix, named)
        replies.append(resp)
        tokens = _token_logprobs(resp.choices[0]) if resp.choices else []
        meta = {**parsed.meta, "continuation": "read"}
        score = self._score_at(tokens, 0, meta, options) if tokens else None
        if score is None:
            return replace(parsed, meta={**meta, "continuation": "no usable logprobs"})
        return replace(parsed, score=score, source="logprobs", meta=meta)

    async def _continuation_reply(self, what: str, messages: list[dict[str, Any]],
                                  prefix: str, named: bool) -> ChatReply:
        """The continuation's reply: its images named by uuid where the first request
        (`messages`) `named` them, sent again where the server refuses that
        (`rescue.models.image_names`); the error of the request with images otherwise."""
        refusal = None
        if named and self.names.on:
            self.names.tries += 1
            try:
                return await self.chat.create(f"{what} answer", **self.continuation(
                    images_by_uuid(messages), prefix))
            except EndpointError as exc:
                if not refused(exc):
                    raise
                refusal = exc
        resp = await self.chat.create(f"{what} answer", **self.continuation(messages, prefix))
        if refusal is not None:
            self.names.sent_again(refusal, "continuation")
        return resp

    def answer_prefix(self, choice: Any) -> str | None:
        """The reply up to its verdict (`continuation_prefix`), None when it has no answer
        position; a scan of untrusted text, run in the pool."""
        reply = answers.reply_of(choice.message)
        at = answer_offset(reply.answer, self.scale)
        return None if at is None else continuation_prefix(reply, at)

    def continuation(self, messages: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
        """The one-token request after the reply's `prefix` (reasoning + answer up to its
        verdict): the run's messages and sampling, the assistant message continued (without a
        `sampling.extra` min_tokens, which vLLM refuses above max_tokens=1)."""
        kwargs: dict[str, Any] = dict(self.sampling.request_kwargs())
        extra = {k: v for k, v in kwargs["extra_body"].items() if k != "min_tokens"}
        kwargs["extra_body"] = {**extra, "continue_final_message": True,
                                "add_generation_prompt": False}
        kwargs.update(max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs)
        return {"messages": [*messages, {"role": "assistant", "content": prefix}], "n": 1,
                "seed": self.seed, **kwargs}

    def payload(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The keyword arguments of one verification call (the run's and the probe's)."""
        kwargs: dict[str, Any] = dict(self.sampling.request_kwargs())
        if self.logprobs and self.logprobs_at == "stream":
            kwargs.update(logprobs=True, top_logprobs=self.top_logprobs)
        return {"messages": messages, "n": 1, "seed": self.seed, **kwargs}

    def read(self, choice: Any, options: int = 2) -> Verdict:
        """The Verdict in one response choice (pure; exposed for tests and re-scoring).

        A reply cut off at max_tokens (`finish_reason=length`) is `verify:truncated` and never
        scored: without a reasoning parser its reasoning carries no tag, and a "no" inside it
        would be read as the answer. Its answer, reasoning and raw text are kept up to
        `answers.RAW_CAP` characters each (full lengths in meta `answer_chars`,
        `reasoning_chars`, `raw_chars`); the score is read from the whole reply.
        """
        v = self._read(choice, options)
        meta = dict(v.meta)
        texts = {name: answers.cap_raw(meta, name, getattr(v, name))
                 for name in ("answer", "reasoning", "raw")}
        return v if meta == v.meta else replace(v, meta=meta, **texts)

    def _read(self, choice: Any, options: int = 2) -> Verdict:
        msg = choice.message
        content = getattr(msg, "content", None)
        reply = answers.reply_of(msg)
        raw = content or ""
        finish = getattr(choice, "finish_reason", None)
        meta: dict[str, Any] = {"finish_reason": finish,
                                "reasoning_placement": reply.placement}
        tokens = _token_logprobs(choice)
        if tokens:
            meta["tokens"] = len(tokens)
        if finish == "length":
            reasoning = reply.reasoning if reply.placement != "none" else reply.answer
            return Verdict(score=None, answer="", reasoning=reasoning, raw=raw, source="",
                           error=f"verify:truncated reply cut off at max_tokens="
                           f"{self.sampling.max_tokens} ({len(tokens) or '?'} tokens, "
                           f"reasoning {reply.placement})", meta={**meta, "truncated": True})
        if tokens:
            score = self._logprob_score(tokens, reply, meta, options)
            if score is not None:
                return Verdict(score=score, answer=reply.answer, reasoning=reply.reasoning,
                               raw=raw, source="logprobs", meta=meta)
        if len(reply.answer) > answers.PARSE_CAP:  # bounded work on hostile text
            return Verdict(score=None, answer="", reasoning=reply.reasoning, raw=raw, source="",
                           error=f"verify:too_long answer of {len(reply.answer)} characters "
                           f"(parsed up to {answers.PARSE_CAP})", meta=meta)
        if self.scale == "yes_no":
            parsed = answers.parse_yes_no(reply.answer)
        elif self.scale == "choice":
            pick = answers.parse_choice(reply.answer, options)
            parsed = None
            if pick is not None:
                meta["choice"] = pick - 1
                parsed = float(pick == 1) if self.call_shape == "pairwise" else 1.0
        else:
            parsed = answers.parse_rating(reply.answer, self.rating_max)
        if parsed is not None:
            return Verdict(score=parsed, answer=reply.answer, reasoning=reply.reasoning,
                           raw=raw, source="parsed", meta=meta)
        why = ("reasoning unfinished" if reply.placement == "unfinished" else
               f"answer {reply.answer[:80]!r}")
        return Verdict(score=None, answer=reply.answer, reasoning=reply.reasoning, raw=raw,
                       source="", error=f"verify:unparseable {why} "
                       f"(finish_reason={finish})", meta=meta)

    def _logprob_score(self, tokens: Sequence[answers.TokenLogprob], reply: answers.Reply,
                       meta: dict[str, Any], options: int = 2) -> float | None:
        texts = getattr(tokens, "texts", None) or [t.token for t in tokens]
        start = answers.reasoning_end(texts, reply)
        if self.scale in ("choice", "rating"):
            i = answers.number_token(texts, start)
        else:
            k = answers.verdict_offset("".join(texts)[start:])
            i = None if k is None else answers.token_at(texts, start + k)
        return None if i is None else self._score_at(tokens, i, meta, options)

    def _score_at(self, tokens: Sequence[answers.TokenLogprob], i: int, meta: dict[str, Any],
                  options: int = 2) -> float | None:
        """The score read at answer token `i` (meta gains what it was read from)."""
        if self.scale == "choice":  # arena: P(1) over P(1) + P(2); listwise: the likeliest mark
            probs = answers.choice_probs(tokens[i], options)
            if probs is None:
                return None
            meta["answer_token"] = i
            if self.call_shape == "pairwise":
                return probs[0]
            meta["choice"], meta["probs"] = int(np.argmax(probs)), probs
            return max(probs)
        if self.scale == "rating":
            meta["answer_token"] = i
            return answers.rating_score(tokens, i, self.rating_max)
        meta["answer_token"] = i
        yn = answers.yes_no_score(tokens[i])
        if yn is None:
            return None
        meta.update(p_yes=yn.p_yes, p_no=yn.p_no)
        if yn.bounded:
            meta["bounded"] = True
        return yn.score

    async def preflight(self, sample: Sample | None = None) -> list[str]:
        """The endpoint serves the model; with `sample`, one verification of a box-shaped mask
        on it (every view drawn, so the image count is the run's) is probed with
        max_tokens=1."""
        if sample is None:
            return await self.chat.preflight()
        # a query UTF-8 cannot carry fails its own sample; the probe sends it repaired
        sample = replace(sample, query=replaced(sample.query))
        h, w = sample.image.shape[:2]
        mask = np.zeros((h, w), dtype=bool)
        mask[h // 4: max(h // 4 + 1, 3 * h // 4), w // 4: max(w // 4 + 1, 3 * w // 4)] = True
        if self.call_shape == "pairwise":
            urls = await self.views(sample, mask)
            messages = self._pair_messages(sample, urls + urls)
        elif self.call_shape == "listwise":
            messages = await self.pool.run(self.render_marks, sample, [mask] * self.top_k)
        else:
            messages = self._messages(sample, await self.views(sample, mask))
        payload = self.payload(named_images(messages) if self.names_images else messages)
        if self.logprobs_at == "answer":  # the continuation's top_logprobs must pass too
            payload.update(logprobs=True, top_logprobs=self.top_logprobs)
        return await self.chat.preflight(payload)

    async def aclose(self) -> None:
        await self.chat.aclose()
        self.pool.close()

    def stats(self) -> dict[str, Any]:
        """The endpoint's counters (a request refused and sent again counts twice, once as a
        failure) and, where any was, the requests sent again without naming their images."""
        return {**self.chat.stats(), **self.names.stats()}
