"""An OpenAI-compatible stand-in for vLLM: /v1/models and /v1/chat/completions, vLLM's wire format.

It answers from scripted policies (`scripts.py`) instead of a model, so the real clients can be
tested end to end over real HTTP, in vLLM 0.32's layout as captured from the real server
(tests/fixtures/vllm_captured/, checked by tests/test_standin_parity.py):
- `choices` of length n with `index`; `message` with `reasoning` / `reasoning_content` (or the
  reasoning left in `content` up to `</think>`, as without a reasoning parser), no `tool_calls`;
- `logprobs.content[].top_logprobs` for every generated token, reasoning included: the sampled
  token first, the EOS token last, -9999.0 for what a grammar forbade;
- `usage.completion_tokens_details.reasoning_tokens` behind a reasoning parser; `stop_reason`
  None or a stop token's id; vLLM's response keys;
- vLLM's error JSON and wording: 404 for an unknown model; 400 for too many logprobs, too many
  images, a prompt + max_tokens past max_model_len or a schema the grammar backend refuses; the
  500 vLLM answers once to the next request with the images of such a 400.

Faults are deterministic: whether a request fails depends on (seed, the request body, how many
times that same body was seen), never on arrival order, so a concurrent client meets the same
faults in every run and a retry of the same body eventually passes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import socket
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from rescue.images import decode as decode_image

REASONING_PLACEMENTS = ("reasoning", "reasoning_content", "both", "content", "content_open")
"""Where a thinking model's reasoning goes: vLLM >= 0.11 with a parser (`reasoning`), older vLLM
(`reasoning_content`), both fields, no parser (`content` = "reasoning</think>\\n\\nanswer", the
template having opened <think>), or no parser with the opening tag generated (`content_open`)."""


@dataclass
class Completion:
    """One scripted choice: the final answer text, optional reasoning, and the distribution
    (token -> probability) at the answer token, the first token of `answer_token` in `text`."""

    text: str
    reasoning: str | None = None
    answer_token: str | None = None
    answer_dist: Mapping[str, float] | None = None
    finish_reason: str = "stop"


@dataclass
class ChatRequest:
    """What a policy sees: the body, the prompt's text, the decoded images, n and seed."""

    body: dict[str, Any]
    text: str
    images: list[np.ndarray]
    n: int
    seed: int | None


class Policy(Protocol):
    def __call__(self, request: ChatRequest) -> list[Completion]: ...


@dataclass
class Faults:
    """A `fraction` of chat requests fail, as one of `kinds`: "500" (HTTP 500), "503" (with
    Retry-After), "timeout" (answer after `sleep_s`), "drop" (connection closed mid-response)."""

    fraction: float = 0.0
    kinds: tuple[str, ...] = ("500", "timeout", "drop")
    seed: int = 0
    sleep_s: float = 3.0

    def decide(self, body_key: str, attempt: int) -> str | None:
        if self.fraction <= 0:
            return None
        h = hashlib.sha256(f"{self.seed}|{body_key}|{attempt}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        if u >= self.fraction:
            return None
        return self.kinds[h[8] % len(self.kinds)]


_TOKEN = re.compile(r"</think>|<think>|\n+|[ ]?[A-Za-z]+|[ ]?\d|[ ]?[^\sA-Za-z\d]|[ ]+")


def tokenize(text: str) -> list[str]:
    """A Qwen-like split: words with their leading space, single digits, punctuation, newlines,
    and the think tags as single tokens. Concatenating the tokens gives back `text`."""
    tokens = _TOKEN.findall(text)
    assert "".join(tokens) == text, "stand-in tokenizer lost characters"
    return tokens


_FILLERS = (" the", " a", ",", ".", " of", " and", " is", " to", " in", " it", " that", " on",
            " this", " with", " for", " as", " at", " be", " by", " an", " or")


def _lp_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


MASKED = -9999.0
"""What vLLM lists for a token a grammar forbade (its clamp of -inf)."""


def logprobs_content(tokens: list[str], answer_at: int | None, dist: Mapping[str, float] | None,
                     k: int, masked: bool = False) -> list[dict[str, Any]]:
    """vLLM's `logprobs.content`: per token the sampled token first, then the most likely
    others in rank order, k in all. Under a grammar (`masked`) the alternatives it forbade are
    listed at -9999.0 (all but the likeliest, as captured)."""
    out = []
    for i, tok in enumerate(tokens):
        if i == answer_at and dist:
            ranked = sorted(((t, math.log(p)) for t, p in dist.items() if p > 0),
                            key=lambda x: -x[1])
            sampled = dict(ranked).get(tok, -20.0)
            others = [(t, lp) for t, lp in ranked if t != tok]
        else:
            sampled = -0.05
            fill = [f for f in _FILLERS if f != tok]
            others = [(f, MASKED if masked and j > 0 else -4.0 - j * 0.25)
                      for j, f in enumerate(fill)]
        top = [_lp_entry(tok, sampled)] + [_lp_entry(t, lp) for t, lp in others]
        out.append({**_lp_entry(tok, sampled), "top_logprobs": top[:k]})
    return out


def prompt_tokens(text: str, images: list[np.ndarray]) -> int:
    """The stand-in's prompt length: its text tokens plus 256 per image."""
    return len(tokenize(text)) + 256 * len(images)


def _images_key(body: Mapping[str, Any]) -> str | None:
    """A digest of a request's image URLs (None without images)."""
    urls = [part["image_url"]["url"] for m in body.get("messages") or []
            if isinstance(m.get("content"), list) for part in m["content"]
            if isinstance(part, Mapping) and part.get("type") == "image_url"]
    return hashlib.sha256("|".join(urls).encode()).hexdigest() if urls else None


def _decode_data_url(url: str) -> np.ndarray | None:
    if not url.startswith("data:"):
        return None
    try:
        raw = base64.b64decode(url.split(",", 1)[1])
        return decode_image(raw, what="image_url")
    except Exception:
        return None


class DecodedImages:
    """Data URLs decoded once: a request's refusal check and its answer read the same images,
    and a two-step verdict's continuation resends its first request's. Arrays are read-only."""

    def __init__(self, size: int = 256):
        self.size = size
        self._lock = threading.Lock()
        self._memo: OrderedDict[str, np.ndarray | None] = OrderedDict()

    def __call__(self, url: str) -> np.ndarray | None:
        with self._lock:
            if url in self._memo:
                self._memo.move_to_end(url)
                return self._memo[url]
        img = _decode_data_url(url)
        if img is not None:
            img.flags.writeable = False
        with self._lock:
            self._memo[url] = img
            while len(self._memo) > self.size:
                self._memo.popitem(last=False)
        return img


class MediaCache:
    """vLLM's multimodal processor cache as a client sees it (captured from vLLM 0.32, CPU
    build): an image part carrying a `uuid` is kept under it, and a later part with
    `"image_url": null` and that uuid is served from it. A uuid not held is a 400 "Cache miss
    for image at index i but data is not provided.", as after an eviction, or with
    `api_servers` > 1 (vLLM --api-server-count: requests go round the processes, each with its
    own cache). `size` 0 is a server without the cache (--mm-processor-cache-gb 0): every
    such part is a 400 from the HF processor, handed no image."""

    def __init__(self, size: int = 1024, api_servers: int = 1):
        self.size = size
        self._lock = threading.Lock()
        self._caches: list[OrderedDict[str, str]] = [OrderedDict() for _ in range(api_servers)]
        self._turn = 0

    def resolve(self, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """`body` with every image named by uuid alone given its URL back, or the 400's message
        of the first one not held."""
        with self._lock:
            cache = self._caches[self._turn % len(self._caches)]
            self._turn += 1
            index, out = 0, []
            for m in body.get("messages") or []:
                content = m.get("content")
                if not isinstance(content, list):
                    out.append(m)
                    continue
                parts = []
                for part in content:
                    if isinstance(part, Mapping) and part.get("type") == "image_url":
                        part, missing = self._resolve_part(cache, part, index)
                        if missing is not None:
                            return body, missing
                        index += 1
                    parts.append(part)
                out.append({**m, "content": parts})
        return {**body, "messages": out}, None

    def _resolve_part(self, cache: OrderedDict[str, str], part: Mapping[str, Any], index: int
                      ) -> tuple[Mapping[str, Any], str | None]:
        uuid_, data = part.get("uuid"), part.get("image_url")
        if data is None and uuid_ is None:
            return part, (f"multi_modal_data['image'][{index}] is empty but "
                          f"multi_modal_uuids['image'][{index}] is missing.")
        if data is None and self.size == 0:
            return part, ("Failed to apply Qwen3VLProcessor on data={'text': "
                          "'<|vision_start|><|image_pad|><|vision_end|>', 'images': [None]}")
        if data is None:
            url = cache.get(str(uuid_))
            if url is None:
                return part, f"Cache miss for image at index {index} but data is not provided."
            cache.move_to_end(str(uuid_))
            return {"type": "image_url", "image_url": {"url": url}}, None
        if uuid_ is not None and self.size > 0:
            cache[str(uuid_)] = data["url"]
            cache.move_to_end(str(uuid_))
            while len(cache) > self.size:
                cache.popitem(last=False)
        return part, None


def opaque_image(url: str) -> np.ndarray:
    """An image left undecoded: the SHA-256 of its URL, as 32 bytes (one per image all the
    same, so counts and prompt lengths are unchanged, and a hash judge still tells images
    apart)."""
    return np.frombuffer(hashlib.sha256(url.encode()).digest(), dtype=np.uint8)


def _read_messages(messages: list[dict[str, Any]],
                   decode: Callable[[str], np.ndarray | None] = _decode_data_url
                   ) -> tuple[str, list[np.ndarray]]:
    texts, images = [], []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                img = decode(part["image_url"]["url"])
                if img is not None:
                    images.append(img)
    return "\n".join(texts), images


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    """vLLM's ErrorResponse: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": status}}, status_code=status)


class _Drop(Response):
    """Starts a response promising more bytes than it sends, then fails: the server closes the
    connection mid-body, which a client sees as a dropped connection."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"4096")]})
        await send({"type": "http.response.body", "body": b'{"id": "chatcmpl-', "more_body": True})
        raise ConnectionAbortedError("stand-in fault: connection dropped")


@dataclass
class StandIn:
    """The stand-in server's state: served models and their policies, faults, counters."""

    models: Mapping[str, Policy]
    reasoning_placement: str = "reasoning"
    faults: Faults = field(default_factory=Faults)
    delay_s: float = 0.0  # every chat answer waits this long (slow mode)
    models_delay_s: float = 0.0  # /v1/models waits this long (slow preflight)
    latency_s: Mapping[str, float] = field(default_factory=dict)  # per model: a GPU's time
    capacity: Mapping[str, int] = field(default_factory=dict)  # per model: requests at once
    continuation_latency_s: float = 0.05  # a continue_final_message request: cached prefill
    max_logprobs: int = 20
    max_model_len: int = 262144  # Qwen3-VL native context: vLLM's default without --max-model-len
    max_images: int | None = None  # --limit-mm-per-prompt '{"image": k}' (None: no limit)
    structured_outputs: bool = True  # False: a response_format is refused, as by xgrammar
    # models whose images are never decoded: each stands for its URL's digest (`opaque_image`).
    # For the benchmarks' verifier, whose judge need only be deterministic: decoding two JPEGs
    # per request was 56% of the stand-in's CPU, on the cores the client under test shares
    opaque_images: frozenset[str] = frozenset()
    eos_token: str = "<|im_end|>"
    eos_token_id: int = 151645  # <|im_end|>; <|endoftext|> is 151643
    _poisoned: Counter[str] = field(default_factory=Counter)  # images of a 400: next one 500s
    requests: list[dict[str, Any]] = field(default_factory=list)  # chat bodies that got an answer
    usages: list[dict[str, Any]] = field(default_factory=list)  # the `usage` each answer sent
    received: Counter[str] = field(default_factory=Counter)  # per path, faults included
    faults_served: Counter[str] = field(default_factory=Counter)
    served: Counter[str] = field(default_factory=Counter)  # latency mode: model/kind -> count
    _seen: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _semaphores: dict[str, asyncio.Semaphore] = field(default_factory=dict)
    _images: DecodedImages = field(default_factory=DecodedImages)
    media: MediaCache = field(default_factory=MediaCache)  # images named by uuid

    def __post_init__(self) -> None:
        if self.reasoning_placement not in REASONING_PLACEMENTS:
            raise ValueError(f"reasoning_placement must be one of {REASONING_PLACEMENTS}")

    def _slots(self, model: str) -> asyncio.Semaphore:
        """`capacity[model]` slots (unbounded without), made on the serving loop."""
        if model not in self._semaphores:
            self._semaphores[model] = asyncio.Semaphore(int(self.capacity.get(model, 1 << 30)))
        return self._semaphores[model]

    def chat_requests(self, model: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if model is None or r.get("model") == model]

    def app(self) -> FastAPI:
        app = FastAPI(title="vLLM stand-in")

        @app.get("/health")
        async def health() -> Response:
            self.received["/health"] += 1
            return Response(status_code=200)

        @app.get("/v1/models")
        async def models() -> JSONResponse:
            self.received["/v1/models"] += 1
            if self.models_delay_s:
                await asyncio.sleep(self.models_delay_s)
            now = int(time.time())
            data = [{"id": name, "object": "model", "created": now, "owned_by": "vllm",
                     "root": name, "parent": None, "max_model_len": self.max_model_len,
                     "permission": [{"id": f"modelperm-{uuid.uuid4().hex}",
                                     "object": "model_permission", "created": now,
                                     "allow_create_engine": False, "allow_sampling": True,
                                     "allow_logprobs": True, "allow_search_indices": False,
                                     "allow_view": True, "allow_fine_tuning": False,
                                     "organization": "*", "group": None,
                                     "is_blocking": False}]}
                    for name in self.models]
            return JSONResponse({"object": "list", "data": data})

        @app.get("/standin/served")
        async def served() -> JSONResponse:
            with self._lock:
                return JSONResponse(dict(self.served))

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            self.received["/v1/chat/completions"] += 1
            raw = await request.body()
            try:
                body = json.loads(raw)
            except ValueError:
                return _error(400, "invalid JSON body", "BadRequestError")
            key = hashlib.sha256(raw).hexdigest()
            with self._lock:
                attempt = self._seen[key]
                self._seen[key] += 1
            fault = self.faults.decide(key, attempt)
            if fault is not None:
                self.faults_served[fault] += 1
                if fault == "500":
                    return _error(500, "stand-in fault: internal error", "InternalServerError")
                if fault == "503":
                    return JSONResponse({"error": {"message": "overloaded", "type":
                                                   "ServiceUnavailableError", "param": None,
                                                   "code": 503}}, status_code=503,
                                        headers={"Retry-After": "0"})
                if fault == "drop":
                    return _Drop()
                await asyncio.sleep(self.faults.sleep_s)  # "timeout": the client gives up first
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            received, (body, missing) = body, self.media.resolve(body)
            if missing is not None:
                return _error(400, missing, "BadRequestError")
            model = body.get("model")
            if model in self.latency_s:  # a server of fixed latency and slots (benchmarks)
                cont = bool(body.get("continue_final_message"))
                with self._lock:
                    self.served[f"{model}/{'continuation' if cont else 'request'}"] += 1
                async with self._slots(model):
                    await asyncio.sleep(self.continuation_latency_s if cont
                                        else self.latency_s[model])
            if model not in self.models:
                return _error(404, f"The model `{model}` does not exist.", "NotFoundError",
                              "model")
            top_k = int(body.get("top_logprobs") or 0)
            if body.get("logprobs") and top_k > self.max_logprobs:
                return _error(400, f"Requested sample logprobs of {top_k}, which is greater "
                              f"than max allowed: {self.max_logprobs} (parameter=logprobs, "
                              f"value={top_k})", "BadRequestError", "logprobs")
            if body.get("response_format") and not self.structured_outputs:
                return _error(400, "The provided JSON schema contains features not supported "
                              "by xgrammar.", "BadRequestError")
            images_key = _images_key(body) if self._poisoned else None  # digests cost CPU
            with self._lock:
                poisoned = images_key is not None and self._poisoned.pop(images_key, 0) > 0
            if poisoned:  # vLLM: the request after a 400 on the same images fails once
                return _error(500, "EngineCore encountered an issue. See stack trace (above) "
                              "for the root cause.", "InternalServerError")
            refusal = self._refusal(body)
            if refusal is not None:
                images_key = images_key or _images_key(body)
                if images_key is not None:
                    with self._lock:
                        self._poisoned[images_key] += 1
                return refusal
            resp = await asyncio.to_thread(self._complete, body)
            with self._lock:
                self.requests.append(received)  # as sent: images named by uuid stay so
                self.usages.append({"model": body.get("model"), **resp["usage"]})
            return JSONResponse(resp)

        return app

    def _decoder(self, body: Mapping[str, Any]) -> Callable[[str], np.ndarray | None]:
        return opaque_image if body.get("model") in self.opaque_images else self._images

    def _parser(self) -> bool:
        """Whether a reasoning parser runs (vLLM then fills completion_tokens_details)."""
        return self.reasoning_placement in ("reasoning", "reasoning_content", "both")

    def _refusal(self, body: dict[str, Any]) -> JSONResponse | None:
        """vLLM's 400s decided after the images are processed: too many images, or a prompt
        plus max_tokens past max_model_len (vLLM >= 0.10 wording)."""
        text, images = _read_messages(body.get("messages") or [], self._decoder(body))
        if self.max_images is not None and len(images) > self.max_images:
            return _error(400, f"At most {self.max_images} image(s) may be provided in one "
                          "prompt. (parameter=image)", "BadRequestError", "image")
        prompt = prompt_tokens(text, images)
        max_tokens = int(body.get("max_tokens") or 0)
        if prompt + max_tokens > self.max_model_len:
            return _error(400, f"'max_tokens' or 'max_completion_tokens' is too large: "
                          f"{max_tokens}. This model's maximum context length is "
                          f"{self.max_model_len} tokens and your request has {prompt} input "
                          f"tokens ({max_tokens} > {self.max_model_len} - {prompt}).",
                          "BadRequestError")
        return None

    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages") or []
        if (body.get("continue_final_message") and messages
                and messages[-1].get("role") == "assistant"):
            return self._continuation(body)
        text, images = _read_messages(messages, self._decoder(body))
        n = int(body.get("n") or 1)
        req = ChatRequest(body=body, text=text, images=images, n=n, seed=body.get("seed"))
        completions = list(self.models[body["model"]](req))
        assert len(completions) == n, "a policy must return n completions"
        want_lp = bool(body.get("logprobs"))
        k = int(body.get("top_logprobs") or 0)
        grammar = bool(body.get("response_format"))
        prompt = prompt_tokens(text, images)
        choices, completion_tokens, reasoning_tokens = [], 0, 0
        for index, c in enumerate(completions):
            choice, n_tokens, n_reasoning = self._choice(index, c, want_lp, k, grammar)
            choice["routed_experts"] = None
            choices.append(choice)
            completion_tokens += n_tokens
            reasoning_tokens += n_reasoning
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": body["model"], "choices": choices,
            "service_tier": None, "system_fingerprint": "vllm-0.32.0-standin",
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt + completion_tokens,
                      "completion_tokens": completion_tokens, "prompt_tokens_details": None,
                      "completion_tokens_details": (
                          {"reasoning_tokens": reasoning_tokens} if self._parser() else None)},
            "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None,
            "ec_transfer_params": None, "metrics": None, "prompt_text": None,
        }

    def _continuation(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's continue_final_message with max_tokens=1: the next token after the assistant
        message, as the policy answers the same conversation (its answer token and
        distribution), with nothing of the prefix repeated in `content`."""
        messages = body["messages"]
        text, images = _read_messages(messages[:-1], self._decoder(body))
        req = ChatRequest(body=body, text=text, images=images, n=1, seed=body.get("seed"))
        c = next(iter(self.models[body["model"]](req)))
        token = c.answer_token or (tokenize(c.text) or [self.eos_token])[0]
        logprobs = None
        if body.get("logprobs"):
            logprobs = {"content": logprobs_content([token], 0, c.answer_dist,
                                                    max(int(body.get("top_logprobs") or 0), 1))}
        prefix = str(messages[-1].get("content") or "")
        prompt = prompt_tokens(text, images) + len(tokenize(prefix))
        message = {"role": "assistant", "content": token, "refusal": None, "annotations": None,
                   "audio": None, "function_call": None, "reasoning": None}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                             "finish_reason": "length", "stop_reason": None,
                             "token_ids": None}],
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt + 1,
                          "completion_tokens": 1, "prompt_tokens_details": None,
                          "completion_tokens_details": None}}

    def _choice(self, index: int, c: Completion, want_lp: bool, k: int,
                grammar: bool = False) -> tuple[dict[str, Any], int, int]:
        placement = self.reasoning_placement
        if c.reasoning is None:
            generated = c.text
            content: str | None = c.text
            fields: dict[str, Any] = {"reasoning": None} if placement != "reasoning_content" \
                else {"reasoning_content": None}
        else:
            opener = "<think>" if placement == "content_open" else ""
            generated = opener + c.reasoning + "</think>\n\n" + c.text
            if placement in ("content", "content_open"):
                content, fields = generated, {"reasoning": None}
            else:
                content = "\n\n" + c.text
                fields = {"reasoning": c.reasoning} if placement == "reasoning" else (
                    {"reasoning_content": c.reasoning} if placement == "reasoning_content" else
                    {"reasoning": c.reasoning, "reasoning_content": c.reasoning})
        tokens = tokenize(generated)
        # Qwen's generation_config stops on <|im_end|> (the tokenizer's EOS: stop_reason None)
        # and <|endoftext|> (a stop token: stop_reason its id); odd choices take the second
        eos, stop_id = ((self.eos_token, None) if index % 2 == 0 else
                        ("<|endoftext|>", self.eos_token_id - 2))
        logprobs = None
        if want_lp:
            answer_at = None
            if c.answer_token is not None:
                start = generated.rfind("</think>")
                start = 0 if start < 0 else start + len("</think>")
                pos = 0
                for i, t in enumerate(tokens):
                    if pos >= start and t == c.answer_token:
                        answer_at = i
                        break
                    pos += len(t)
            listed = tokens + ([eos] if c.finish_reason == "stop" else [])
            logprobs = {"content": logprobs_content(listed, answer_at, c.answer_dist, max(k, 1),
                                                    masked=grammar)}
        n_reasoning = len(tokenize(c.reasoning)) if c.reasoning else 0
        n_tokens = len(tokens) + (1 if c.finish_reason == "stop" else 0)
        message = {"role": "assistant", "content": content, "refusal": None,
                   "annotations": None, "audio": None, "function_call": None, **fields}
        stop_reason = stop_id if c.finish_reason == "stop" else None
        return ({"index": index, "message": message, "logprobs": logprobs,
                 "finish_reason": c.finish_reason, "stop_reason": stop_reason,
                 "token_ids": None}, n_tokens, n_reasoning)


class ServerThread:
    """A uvicorn server for `app` on 127.0.0.1 and a free port, in a daemon thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1"):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.host, self.port = self._sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level="critical", access_log=False,
                                timeout_graceful_shutdown=1, lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run,
                                        kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A port nothing listens on (for 'endpoint down' tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(standin: StandIn) -> ServerThread:
    return ServerThread(standin.app()).start()


Judge = Callable[[ChatRequest], float]
