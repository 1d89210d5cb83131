"""Planner client: a VLM behind vLLM's OpenAI API samples grounding hypotheses.

Hypothesis i is drawn with seed base_seed + i. vLLM (V1 engine) gives child k of a request with
`n` and `seed` the seed `seed + k`, so indices i..j go in one request with n = j - i + 1 and
seed = base_seed + i: the image is prefilled once for all of them, and raising max_n from 16 to
64 later asks only for 16..63 with the same per-index seeds. Only contiguous runs share a
request (the caller passes the indices it is missing); `max_hypotheses_per_request` splits long
runs so no single request holds up a server.

Coordinates: `coords: relative_1000` (Qwen3-VL) maps 0-1000 to the original image whatever
size was sent. `coords: absolute` (Qwen2.5-VL) means pixels of the image the model saw; give
`resize: {kind: smart_resize, factor: 28, min_pixels: ..., max_pixels: ...}` matching the
server's processor so they map back (without `resize`, the sent image's pixels are assumed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from rescue import cost
from rescue.failures import TransportError
from rescue.hypothesis import Hypothesis, contiguous_runs
from rescue.models import answers
from rescue.models.chat import ChatEndpoint, ImageEncoding, PromptTemplate, Sampling
from rescue.models.grounding import (
    COORDS,
    MIN_BOX_PX,
    MULTI_OBJECT,
    Frame,
    frame_for,
    grounding_schema,
    parse_grounding,
)
from rescue.models.http import EndpointError, RetryPolicy, plain
from rescue.models.workers import WorkerPool
from rescue.sample import Sample
from rescue.text import first_unencodable, replaced

GROUNDING_SCHEMA: dict[str, Any] = grounding_schema("relative_1000")
"""The schema a relative_1000 planner sends with `structured_output: true` (response_format
json_schema); a planner builds its own from its coords (`grounding_schema`, bounds there)."""


def _capped(h: Hypothesis) -> Hypothesis:
    """`h` with its raw text and reasoning cut to `answers.RAW_CAP` for the cache (full lengths
    in meta `raw_chars` / `reasoning_chars`); parsing has already read the whole text."""
    meta = dict(h.meta)
    raw = answers.cap_raw(meta, "raw", h.raw)
    if isinstance(meta.get("reasoning"), str):
        meta["reasoning"] = answers.cap_raw(meta, "reasoning", meta["reasoning"])
    return h if meta == h.meta else replace(h, raw=raw, meta=meta)


class OpenAIPlanner:
    """Planner over an OpenAI-compatible chat endpoint (vLLM serving Qwen3-VL-Instruct)."""

    simulated = False

    def __init__(self, model: str, base_url: str, prompt: Mapping[str, Any] | str, *,
                 api_key: str | None = "EMPTY", timeout_s: float = 120.0,
                 max_concurrency: int = 16, sampling: Mapping[str, Any] | None = None,
                 base_seed: int = 0, max_hypotheses_per_request: int = 16,
                 coords: str = "relative_1000", resize: Mapping[str, Any] | None = None,
                 image: Mapping[str, Any] | None = None, structured_output: bool = False,
                 multi_object: str = "first", out_of_image_tolerance: float = 0.05,
                 min_box_px: float = MIN_BOX_PX,
                 retry: Mapping[str, Any] | RetryPolicy | None = None,
                 preflight_timeout_s: float = 10.0, thinking: bool = False,
                 workers: int | None = None):
        if coords not in COORDS:
            raise ValueError(f"planner.coords must be one of {COORDS}, got {coords!r}")
        if multi_object not in MULTI_OBJECT:
            raise ValueError(f"planner.multi_object must be one of {MULTI_OBJECT}, "
                             f"got {multi_object!r}")
        if max_hypotheses_per_request < 1:
            raise ValueError("planner.max_hypotheses_per_request must be >= 1")
        self.model = model
        self.template = PromptTemplate.from_config(prompt, required=("query",))
        self.sampling = Sampling.from_config(sampling)
        self.base_seed = int(base_seed)
        self.max_per_request = int(max_hypotheses_per_request)
        self.coords = coords
        self.resize = plain(resize)
        self.image = ImageEncoding.from_config(image)
        self.structured_output = bool(structured_output)
        self.schema = grounding_schema(coords)
        self.multi_object = multi_object
        self.tolerance = float(out_of_image_tolerance)
        self.min_box_px = float(min_box_px)
        self.thinking = bool(thinking)
        self.chat = ChatEndpoint("planner", model, base_url, api_key=api_key,
                                 timeout_s=timeout_s, max_concurrency=max_concurrency,
                                 retry=retry, preflight_timeout_s=preflight_timeout_s)
        self.pool = WorkerPool("planner-work", workers)
        if coords == "absolute" and self.resize is not None:
            frame_for(64, 64, coords, self.resize)  # fail on a bad rule now, not per sample

    @property
    def base_url(self) -> str:
        return self.chat.base_url

    def identity(self) -> Mapping[str, Any]:
        """Everything that changes a hypothesis (base_seed included: index i is sampled with
        base_seed + i); not the URL (the same model on another host shares the cache) and not
        the request grouping (per-index seeds do not depend on it)."""
        return {
            "kind": "openai_chat_planner",
            "model": self.model,
            "base_seed": self.base_seed,
            "prompt": self.template.to_json(),
            "sampling": self.sampling.to_json(),
            "coords": self.coords,
            "resize": self.resize,
            "image": self.image.to_json(),
            "structured_output": self.schema if self.structured_output else None,
            "multi_object": self.multi_object,
            "out_of_image_tolerance": self.tolerance,
            "min_box_px": self.min_box_px,
            **({"thinking": True} if self.thinking else {}),
        }

    def messages(self, sample: Sample, image_url: str) -> list[dict[str, Any]]:
        return self.template.messages([image_url], query=sample.query)

    async def plan(self, sample: Sample, indices: Sequence[int]) -> list[Hypothesis]:
        """One Hypothesis per index in `indices`, in order (seed of index i: base_seed + i).

        Raises a `TransportError` (with the hypotheses that did arrive in `.partial`) when a
        request still fails after its retries. A request UTF-8 cannot carry (a lone surrogate
        in the query, `rescue.text`) is not sent: every index is `plan:bad_text`, an answer.
        """
        if not indices:
            return []
        url = await self.pool.run(self.image.data_url, sample.image)
        frame = frame_for(sample.width, sample.height, self.coords, self.resize,
                          self.image.sent_size(sample.width, sample.height))
        messages = self.messages(sample, url)
        why = first_unencodable(messages)
        if why is not None:  # permanent: the same query fails the same way on every rerun
            return [Hypothesis.invalid(int(i), "", f"plan:bad_text {why}") for i in indices]
        runs = contiguous_runs(indices, self.max_per_request)
        outs = await asyncio.gather(*(self._request(messages, start, count, frame)
                                      for start, count in runs), return_exceptions=True)
        by_index: dict[int, Hypothesis] = {}
        errors: list[BaseException] = []
        for out in outs:
            if isinstance(out, BaseException):
                errors.append(out)
                if isinstance(out, TransportError):
                    by_index.update((h.index, h) for h in out.partial)
            else:
                by_index.update((h.index, h) for h in out)
        defects = [e for e in errors if not isinstance(e, TransportError)]
        if defects:  # a bug is not a network error: raise it as it is
            raise defects[0]
        if errors:
            first = errors[0]
            assert isinstance(first, TransportError)
            first.partial = [by_index[i] for i in sorted(by_index)]
            raise first
        return [by_index[int(i)] for i in indices]

    def payload(self, messages: list[dict[str, Any]], start: int, count: int) -> dict[str, Any]:
        """The keyword arguments of the chat call for indices start..start+count-1 (the run's
        requests and the preflight probe are built here, so they cannot differ)."""
        kwargs: dict[str, Any] = dict(self.sampling.request_kwargs())
        if self.structured_output:
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "grounding", "schema": self.schema}}
        return {"messages": messages, "n": count, "seed": self.base_seed + start, **kwargs}

    async def _request(self, messages: list[dict[str, Any]], start: int, count: int,
                       frame: Frame) -> list[Hypothesis]:
        seed = self.base_seed + start
        t0 = time.perf_counter()
        resp = await self.chat.create(f"plan n={count} seed={seed}",
                                      **self.payload(messages, start, count))
        latency = time.perf_counter() - t0
        hyps, choices = await self.pool.run(self.read_choices, resp.choices or (), start,
                                            count, frame)
        got = sorted(hyps)  # the request's cost: prompt once, each child its completion
        for i, c in zip(got, cost.request_costs(
                cost.Usage.of(resp), [cost.choice_tokens(choices[i]) for i in got],
                [cost.choice_chars(choices[i]) for i in got], latency), strict=True):
            hyps[i].meta["cost"] = c.to_json()
        missing = [start + k for k in range(count) if start + k not in hyps]
        if missing:  # a server that returned fewer choices than asked: retry on resume
            raise EndpointError(self.base_url, f"plan n={count} seed={seed} returned "
                                f"{len(hyps)} valid choices; indices {missing} missing",
                                partial=[hyps[i] for i in sorted(hyps)])
        return [hyps[start + k] for k in range(count)]

    def read_choices(self, replied: Sequence[Any], start: int, count: int, frame: Frame
                     ) -> tuple[dict[int, Hypothesis], dict[int, Any]]:
        """The hypotheses of one request's choices (child k is index start + k; one outside
        0..count-1 or repeated is dropped) and the choice each came from. Pure CPU work on
        untrusted text, bounded (`grounding.MAX_PARSE_CHARS`) but near a second for a hostile
        answer: `_request` runs it in `self.pool`, so no other sample waits on the event loop."""
        hyps: dict[int, Hypothesis] = {}
        choices: dict[int, Any] = {}
        for choice in replied:
            k = int(choice.index)
            if not 0 <= k < count or start + k in hyps:
                continue
            h = self.read(start + k, choice, frame)
            h.meta["seed"] = self.base_seed + start + k
            hyps[start + k], choices[start + k] = h, choice
        return hyps, choices

    def read(self, index: int, choice: Any, frame: Frame) -> Hypothesis:
        """Hypothesis `index` from one response choice, wherever the server put the answer.

        Behind a reasoning parser the answer is `content` and the thinking `reasoning`; a parser
        that finds no `</think>` may put a non-thinking model's whole answer in `reasoning`,
        which is then parsed. A thinking model's answer exists only after its reasoning closed:
        cut off at max_tokens, or with no closing tag, it is `parse:truncated`, never a box
        drafted inside the reasoning.
        """
        reply = answers.reply_of(choice.message)
        finish = choice.finish_reason
        meta: dict[str, Any] = {"reasoning_placement": reply.placement}
        if reply.reasoning:
            meta["reasoning"] = reply.reasoning
        text = reply.answer
        if self.thinking and (finish == "length" or reply.placement in ("none", "unfinished")
                              or not text):
            why = ("cut off at max_tokens" if finish == "length" else "never closed")
            return _capped(Hypothesis.invalid(index, text, f"parse:truncated reasoning {why} "
                                              f"(finish_reason={finish})", finish_reason=finish,
                                              **meta))
        if not text and reply.placement in ("reasoning", "reasoning_content"):
            text = reply.reasoning
            meta["answer_from"] = reply.placement
        h = parse_grounding(index, text, frame, multi_object=self.multi_object,
                            tolerance=self.tolerance, min_box_px=self.min_box_px,
                            finish_reason=finish)
        h.meta.update(meta)
        return _capped(h)

    async def preflight(self, sample: Sample | None = None) -> list[str]:
        """The endpoint serves the model; with `sample`, the run's first request (as many
        hypotheses as one request holds) is probed with max_tokens=1."""
        if sample is None:
            return await self.chat.preflight()
        url = await self.pool.run(self.image.data_url, sample.image)
        # a query UTF-8 cannot carry fails its own sample; the probe sends it repaired
        probed = replace(sample, query=replaced(sample.query))
        return await self.chat.preflight(self.payload(self.messages(probed, url), 0,
                                                      self.max_per_request))

    async def aclose(self) -> None:
        await self.chat.aclose()
        self.pool.close()

    def stats(self) -> dict[str, Any]:
        return self.chat.stats()
