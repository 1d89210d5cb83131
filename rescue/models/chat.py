"""What the planner and verifier clients share: an OpenAI chat endpoint as vLLM serves it.

vLLM fills every sampling field a request omits from the model's generation_config, so a
request that leaves one out silently changes with the server's model folder. `Sampling` sends
every field explicitly: the OpenAI ones as arguments, vLLM's own (top_k, min_p,
repetition_penalty) in `extra_body`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
import orjson
from PIL import Image

from rescue.models import probe
from rescue.models.http import (
    Endpoint,
    RetryPolicy,
    describe,
    is_retryable,
    openai_model_entry,
    plain,
)
from rescue.models.replies import ChatReply, decode
from rescue.models.transport import HttpClient, Response, StatusError

RESERVED = frozenset({"seed", "n", "logprobs", "top_logprobs", "messages", "model", "stream"})
"""Request fields the clients own; `sampling.extra` may not override them."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    min_p: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 512
    extra: Mapping[str, Any] = field(default_factory=dict)  # more vLLM fields, sent verbatim

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Sampling | None) -> Sampling:
        if isinstance(cfg, Sampling):
            return cfg
        d = dict(plain(cfg) or {})
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown sampling fields {sorted(unknown)}; put vLLM-only "
                             "fields under sampling.extra")
        owned = RESERVED & set(dict(d.get("extra") or {}))
        if owned:
            raise ValueError(f"sampling.extra may not set {sorted(owned)}: the client sets them "
                             "(seed = base_seed + index, n = hypotheses per request, logprobs "
                             "per verifier config), and the cache keys depend on them")
        return cls(**d)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra"] = dict(self.extra)
        return d

    def request_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `chat.completions.create` (seed and n are added by callers)."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "presence_penalty": self.presence_penalty,
            "max_tokens": self.max_tokens,
            "extra_body": {"top_k": self.top_k, "min_p": self.min_p,
                           "repetition_penalty": self.repetition_penalty, **dict(self.extra)},
        }


@dataclass(frozen=True)
class ImageEncoding:
    """How an image travels in a request. JPEG at high quality keeps requests small; `max_side`
    downsizes large photos before sending (relative coordinates are unaffected)."""

    format: str = "jpeg"  # jpeg | png
    quality: int = 90
    max_side: int | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | ImageEncoding | None) -> ImageEncoding:
        if isinstance(cfg, ImageEncoding):
            return cfg
        enc = cls(**dict(plain(cfg) or {}))
        if enc.format not in ("jpeg", "png"):
            raise ValueError(f"image.format must be jpeg or png, got {enc.format!r}")
        return enc

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def sent_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the image as sent."""
        if self.max_side is None or max(width, height) <= self.max_side:
            return width, height
        s = self.max_side / max(width, height)
        return max(1, round(width * s)), max(1, round(height * s))

    def data_url(self, image: np.ndarray) -> str:
        a = np.ascontiguousarray(image)
        w, h = self.sent_size(a.shape[1], a.shape[0])
        if (w, h) != (a.shape[1], a.shape[0]):
            a = np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BICUBIC))
        if self.format == "png":
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            data, mime = buf.getvalue(), "image/png"
        else:
            data, mime = _jpeg(a, int(self.quality)), "image/jpeg"
        return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _jpeg(a: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of the C-contiguous array `a` (`data_url` makes it so). An RGB uint8
    array, every view a verifier sees, goes through OpenCV's libjpeg-turbo: the bytes PIL
    writes (its defaults, 4:2:0, no optimisation; tests/test_views.py checks them against
    PIL's) for about a quarter less CPU, most of it the copy into a PIL image
    (benchmarks/bench_views.py). Grey and RGBA images are converted to RGB by PIL and
    encoded by it."""
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(a, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:  # pragma: no cover - OpenCV raises on what it cannot encode
            raise ValueError(f"JPEG encoding of a {a.shape} image failed")
        return buf.tobytes()
    buf = io.BytesIO()
    Image.fromarray(a).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def error_message(resp: Response) -> str:
    """The server's own words for a failed request: vLLM's `{"error": {"message": ...}}` (older
    releases: a top-level `message`), else the start of the body."""
    try:
        body = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if isinstance(inner.get("message"), str):
            return inner["message"]
    return resp.text[:300].strip() or resp.reason_phrase


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt as data: optional system text and a user text with `{name}` placeholders.

    Only the declared placeholders are replaced (plain string replacement), so templates may
    contain JSON examples with braces without escaping.
    """

    user: str
    system: str = ""
    name: str = ""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | PromptTemplate | str,
                    required: tuple[str, ...] = ()) -> PromptTemplate:
        if isinstance(cfg, PromptTemplate):
            t = cfg
        elif isinstance(cfg, str):
            t = cls(user=cfg)
        else:
            d = dict(plain(cfg))
            t = cls(user=str(d["user"]), system=str(d.get("system") or ""),
                    name=str(d.get("name") or ""))
        missing = [p for p in required if "{" + p + "}" not in t.user]
        if missing:
            raise ValueError(f"prompt template {t.name or '<inline>'} lacks placeholders "
                             f"{['{' + p + '}' for p in missing]}")
        return t

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "system": self.system, "user": self.user}

    def render(self, **fields: str) -> str:
        text = self.user
        for key, value in fields.items():
            text = text.replace("{" + key + "}", value)
        return text

    def messages(self, images: list[str], **fields: str) -> list[dict[str, Any]]:
        """Chat messages: the images first (Qwen-VL's own examples put them before the text)."""
        msgs: list[dict[str, Any]] = []
        if self.system:
            msgs.append({"role": "system", "content": self.system})
        content = [image_part(u) for u in images] + [text_part(self.render(**fields))]
        msgs.append({"role": "user", "content": content})
        return msgs


class ChatEndpoint:
    """vLLM's /chat/completions over one pooled `HttpClient` (per event loop) behind an
    `Endpoint`, the bodies decoded by `replies.decode` (no SDK objects: see `replies`).

    `Endpoint` retries, so every attempt is counted once. A non-2xx answer raises
    `StatusError` carrying the server's error message (`Endpoint` retries 5xx, 408,
    409, 429 and honours Retry-After); a 200 that is not a chat completion of `n` choices
    raises `UndecodableReply` (retried too).
    """

    def __init__(self, role: str, model: str, base_url: str, *, api_key: str | None = "EMPTY",
                 timeout_s: float = 120.0, max_concurrency: int = 8,
                 retry: Mapping[str, Any] | RetryPolicy | None = None,
                 preflight_timeout_s: float = 10.0):
        if not base_url:
            raise ValueError(f"{role}: base_url is empty")
        self.role = role
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or "EMPTY"
        self.timeout_s = float(timeout_s)
        self.preflight_timeout_s = float(preflight_timeout_s)
        self.endpoint = Endpoint(role, self.base_url, max_concurrency=max_concurrency,
                                 retry=retry)
        self.http = HttpClient(self.base_url, timeout_s=self.timeout_s,
                               headers={"Authorization": f"Bearer {self.api_key}"},
                               max_connections=max_concurrency + 4)  # + the probe beside them

    def body(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The JSON body of a call given `chat.completions.create`-style keyword arguments
        (`extra_body` merged in, as the SDK sends it)."""
        body = {"model": self.model, **{k: v for k, v in kwargs.items() if k != "extra_body"}}
        body.update(dict(kwargs.get("extra_body") or {}))
        return body

    async def post(self, kwargs: Mapping[str, Any], timeout_s: float | None = None) -> ChatReply:
        """One request, not retried: the decoded reply, or the error described above."""
        resp = await self.http.post("/chat/completions", orjson.dumps(self.body(kwargs)),
                                    timeout_s=timeout_s)
        if resp.status_code != 200:
            raise StatusError(error_message(resp), resp)
        return decode(resp.content, f"{self.base_url}/chat/completions",
                      n=int(kwargs.get("n") or 1))

    async def create(self, what: str, **kwargs: Any) -> ChatReply:
        """One chat completion (retried on transient failures); the decoded reply."""
        return await self.endpoint.call(lambda: self.post(kwargs), what=what)

    async def preflight(self, payload: Mapping[str, Any] | None = None) -> list[str]:
        """/models answers in time and serves the model; with `payload` (the keyword arguments
        of a real call of the run), one probe request checks that the server accepts it and
        that its prompt plus max_tokens fits the context (see `rescue.models.probe`)."""
        entry, problems = await openai_model_entry(self.role, self.base_url, self.model,
                                                   timeout_s=self.preflight_timeout_s,
                                                   api_key=self.api_key,
                                                   retry=self.endpoint.retry)
        if problems or payload is None:
            return problems
        return await self._probe(payload, entry)

    async def _probe(self, payload: Mapping[str, Any], entry: Mapping[str, Any] | None
                     ) -> list[str]:
        """The run's request with max_tokens=1, outside the run's counters. A transient answer
        is tried again under the endpoint's retry policy, honouring Retry-After (vLLM fails the
        request after a 400 on the same images once with a 500); a refusal is reported at
        once."""
        images = probe.count_images(payload.get("messages"))
        policy = self.endpoint.retry

        async def once() -> ChatReply:
            return await asyncio.wait_for(self.post({**payload, "max_tokens": 1}),
                                          self.timeout_s)

        tried = await policy.run(once, random.Random())
        exc = tried.error
        if exc is None:
            problem = probe.context_problem(tried.value.prompt_tokens,
                                            int(payload.get("max_tokens") or 0),
                                            probe.max_model_len(entry), role=self.role,
                                            images=images)
            return [problem] if problem else []
        if isinstance(exc, StatusError):
            status, message = exc.response.status_code, str(exc)
            if not is_retryable(exc):  # the server refuses this payload
                return [probe.rejection(status, message, role=self.role, payload=payload)]
            failure = f"HTTP {status}: {' '.join(message.split())[:200]}"
        elif is_retryable(exc):  # a timeout, a dropped connection, a garbled 200
            failure = describe(exc)
        else:  # not the server's doing: a bug
            raise exc
        return [f"the probe request (the run's payload, max_tokens=1) to {self.base_url} "
                f"failed {tried.attempts} times, last: {failure}; the server is failing or "
                f"overloaded (pipeline.probe=false skips the probe)"]

    async def aclose(self) -> None:
        await self.http.aclose()

    def stats(self) -> dict[str, Any]:
        return {"role": self.role, "model": self.model, **self.endpoint.stats()}
