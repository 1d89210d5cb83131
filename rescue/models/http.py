"""Plumbing shared by the HTTP model clients: retries, per-endpoint limits, counters, preflight.

A run makes thousands of calls to three servers that are busy, restarted or briefly overloaded;
a transient failure must cost a retry, not a sample. Only what can succeed on a second try is
retried (timeouts, dropped connections, 5xx, 408, 409, 429); any other 4xx is the server refusing
this request, and fails at once (`rescue.failures` records it as permanent).
Every request is counted per endpoint so a run can report how many calls each stage made.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson

from rescue.failures import RETRYABLE_4XX, TransportError
from rescue.models.transport import Dropped, Fault, HttpClient, StatusError, Timeout, Unreachable
from rescue.priority import Slots

T = TypeVar("T")

ENV_VARS = {"planner": "PLANNER_API_BASE", "verifier": "VERIFIER_API_BASE",
            "executor": "EXECUTOR_API_BASE"}
"""Environment variables that override each role's endpoint (resolved in the YAML via oc.env)."""


def plain(value: Any) -> Any:
    """An OmegaConf node (or anything else) as plain Python containers."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: delay_k = min(max_delay, base * 2**k) * (1 ± jitter)."""

    attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    jitter: float = 0.5

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | RetryPolicy | None) -> RetryPolicy:
        if isinstance(cfg, RetryPolicy):
            return cfg
        return cls(**dict(plain(cfg) or {}))

    def __post_init__(self) -> None:
        if self.attempts < 1:  # 0 would make no request at all; 1 means "no retries"
            raise ValueError(f"retry.attempts must be >= 1 (1 = no retries), got {self.attempts}")

    def delay(self, retry: int, rng: random.Random) -> float:
        d = min(self.max_delay_s, self.base_delay_s * (2.0 ** retry))
        return max(0.0, d * (1.0 + self.jitter * (2.0 * rng.random() - 1.0)))

    def wait(self, retry: int, rng: random.Random, asked: float | None) -> float:
        """The pause before retry `retry`: the backoff, or the Retry-After the server `asked`
        for when longer, capped at `max_delay_s` (a server may not stall a run)."""
        wait = self.delay(retry, rng)
        return wait if asked is None else max(wait, min(asked, self.max_delay_s))

    async def run(self, fn: Callable[[], Awaitable[T]], rng: random.Random, *,
                  retryable: Callable[[Exception], bool] | None = None,
                  on_retry: Callable[[Exception], None] | None = None) -> Tried[T]:
        """Call `fn` until it returns, raises an error `retryable` (default `is_retryable`)
        refuses, or has been called `attempts` times; between calls, `wait` (the error's
        `retry_after`). The error comes back in the result, not raised: each caller words its
        own failure. The one retry loop of the clients (work calls, preflight GETs, probe)."""
        retryable = retryable or is_retryable
        for attempt in range(1, self.attempts + 1):
            try:
                return Tried(value=await fn(), attempts=attempt)
            except Exception as exc:
                if attempt == self.attempts or not retryable(exc):
                    return Tried(error=exc, attempts=attempt)
                if on_retry is not None:
                    on_retry(exc)
                await asyncio.sleep(self.wait(attempt - 1, rng, retry_after(exc)))
        raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class Tried(Generic[T]):
    """What `RetryPolicy.run` came to: `fn`'s value, or the error it stopped on (refused as
    not retryable, or the last attempt's), after `attempts` calls."""

    value: T | None = None
    error: Exception | None = None
    attempts: int = 1


class EndpointError(TransportError):
    """A call to `endpoint` that failed for good: a non-retryable answer, or every retry used
    up. `partial` (`TransportError`) carries the results that did arrive before it."""

    def __init__(self, endpoint: str, message: str, *, attempts: int = 1,
                 status: int | None = None, retryable: bool = False,
                 partial: Sequence[Any] = (), retry_after_s: float | None = None):
        super().__init__(f"{endpoint}: {message}", status=status, partial=partial)
        self.endpoint = endpoint
        self.attempts = attempts
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class UndecodableReply(EndpointError):
    """A 200 whose body is not what the protocol answers: not JSON, cut short, or JSON of
    another shape (no `choices`, too few results). It was garbled on the way or by an
    overloaded server, so it is a `TransportError` retried like a dropped connection; a
    well-formed reply whose model text is bad is an answer, not this."""

    def __init__(self, where: str, message: str):
        super().__init__(where, message, retryable=True)


def status_of(exc: BaseException) -> int | None:
    if isinstance(exc, StatusError):
        return int(exc.response.status_code)
    if isinstance(exc, EndpointError):
        return exc.status
    return None


def retry_after_header(response: Any) -> float | None:
    """A response's Retry-After in seconds, if it gives one (an HTTP date: None, back off as
    usual). The one parser of the header for every client."""
    value = getattr(response, "headers", {}).get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def retry_after(exc: BaseException) -> float | None:
    """Seconds a server asked us to wait (Retry-After on 429/503), if it said: carried by the
    error (`EndpointError`, a preflight answer) or on its response."""
    if isinstance(exc, EndpointError | _Again):
        return exc.retry_after_s
    return retry_after_header(getattr(exc, "response", None))


def is_retryable(exc: BaseException) -> bool:
    """Timeouts, connection errors, 5xx, 408, 409 and 429 may pass on a retry; others will not."""
    if isinstance(exc, Fault | asyncio.TimeoutError):
        return True
    if isinstance(exc, EndpointError):
        return exc.retryable
    status = status_of(exc)
    return status is not None and (status >= 500 or status in RETRYABLE_4XX)


def describe(exc: BaseException) -> str:
    status = status_of(exc)
    text = str(exc).strip().replace("\n", " ")
    if len(text) > 300:
        text = text[:300] + "..."
    kind = type(exc).__name__
    return f"{kind} (HTTP {status}): {text}" if status is not None else f"{kind}: {text}"


class Endpoint:
    """One served model as the client sees it: at most `max_concurrency` requests in flight
    (the earliest sample's first: rescue.priority), retries with backoff, and counters.

    Its slots are made per event loop (`Slots`), so one client object survives several
    `asyncio.run` calls (tests, notebooks) without binding to a dead loop.
    """

    def __init__(self, name: str, url: str, *, max_concurrency: int = 8,
                 retry: RetryPolicy | Mapping[str, Any] | None = None,
                 rng: random.Random | None = None):
        if max_concurrency < 1:
            raise ValueError(f"{name}: max_concurrency must be >= 1, got {max_concurrency}")
        self.name = name
        self.url = url
        self.max_concurrency = int(max_concurrency)
        self.retry = RetryPolicy.from_config(retry)
        self._rng = rng or random.Random()
        self._slots = Slots(self.max_concurrency)
        self._in_flight = 0
        self._counts = {"calls": 0, "requests": 0, "retries": 0, "failures": 0, "ok": 0,
                        "max_in_flight": 0}
        self._seconds = 0.0

    def count(self, key: str, k: int = 1) -> None:
        self._counts[key] = self._counts.get(key, 0) + k

    async def call(self, fn: Callable[[], Awaitable[T]], what: str = "request") -> T:
        """Run `fn` (one HTTP request) under the concurrency limit, retrying transient failures.

        Raises EndpointError when the failure is permanent or the retries are used up.
        """
        self._counts["calls"] += 1
        tried = await self.retry.run(lambda: self._request(fn), self._rng,
                                     on_retry=lambda _: self.count("retries"))
        error = tried.error
        if error is None:
            self._counts["ok"] += 1
            return tried.value
        self._counts["failures"] += 1
        retryable = is_retryable(error)
        tail = f" after {tried.attempts} attempts" if retryable else ""
        raise EndpointError(self.url, f"{what} failed{tail}: {describe(error)}",
                            attempts=tried.attempts, status=status_of(error),
                            retryable=retryable) from error

    async def _request(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One attempt of `call`: under the concurrency limit, counted and timed."""
        async with self._slots():
            self._counts["requests"] += 1
            self._in_flight += 1
            self._counts["max_in_flight"] = max(self._counts["max_in_flight"], self._in_flight)
            t0 = time.perf_counter()
            try:
                return await fn()
            finally:
                self._in_flight -= 1
                self._seconds += time.perf_counter() - t0

    def stats(self) -> dict[str, Any]:
        return {"endpoint": self.url, **self._counts, "seconds": round(self._seconds, 3)}


# --- preflight -----------------------------------------------------------------------------


def _down(role: str, url: str, exc: BaseException) -> str:
    env = ENV_VARS.get(role)
    hint = f"; start the server or point {env} at it" if env else ""
    return f"endpoint {url} is down or unreachable ({describe(exc)}){hint}"


def _slow(url: str, timeout_s: float) -> str:
    return f"endpoint {url} did not answer within {timeout_s:g}s (overloaded or stuck?)"


@dataclass(frozen=True)
class _Answer:
    """One preflight GET: the JSON (or None) and the problem ("" when none), whether a retry
    may change it, and the Retry-After the server asked for."""

    body: Any = None
    problem: str = ""
    retryable: bool = False
    retry_after_s: float | None = None


class _Again(Exception):
    """A preflight answer a retry may change, raised for `RetryPolicy.run` to retry."""

    def __init__(self, answer: _Answer):
        super().__init__(answer.problem)
        self.answer = answer
        self.retry_after_s = answer.retry_after_s


async def _get_once(client: HttpClient, role: str, url: str, timeout_s: float,
                    valid: Callable[[Any], bool] | None) -> _Answer:
    try:
        resp = await client.get("")
    except Timeout:
        return _Answer(problem=_slow(url, timeout_s), retryable=True)
    except Unreachable as exc:  # nothing listens there: say so at once
        return _Answer(problem=_down(role, url, exc))
    except Dropped as exc:  # dropped mid-answer: the server is there
        return _Answer(problem=_down(role, url, exc), retryable=True)
    if resp.status_code != 200:
        status = resp.status_code
        return _Answer(problem=f"GET {url} answered HTTP {status}: {resp.text[:200].strip()}",
                       retryable=status >= 500 or status in RETRYABLE_4XX,
                       retry_after_s=retry_after_header(resp))
    try:
        body = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return _Answer(problem=f"GET {url} did not answer JSON: {resp.text[:200].strip()!r}",
                       retryable=True)
    return _Answer(body=body, retryable=valid is not None and not valid(body))


async def get_json(role: str, url: str, timeout_s: float,
                   headers: Mapping[str, str] | None = None, *,
                   retry: RetryPolicy | Mapping[str, Any] | None = None,
                   valid: Callable[[Any], bool] | None = None) -> tuple[Any, list[str]]:
    """GET `url` for a preflight check: (json, []) or (None, [one clear problem]).

    A server that is there but failing (5xx, 408/409/429, a timeout, a dropped connection, a
    200 that is not JSON or fails `valid`) is asked again under the endpoint's `retry` policy,
    waiting at least its Retry-After (capped at `max_delay_s`): one bad answer must not stop a
    run. A refusal (other 4xx) or nothing listening is reported at once. A body still failing
    `valid` after the retries is returned for the caller to name what is wrong with it.
    Problems are phrased without the role (the caller prefixes it)."""
    policy = RetryPolicy.from_config(retry)
    client = HttpClient(url, timeout_s=timeout_s, headers=headers, max_connections=1)

    async def once() -> _Answer:
        answer = await _get_once(client, role, url, timeout_s, valid)
        if answer.retryable:
            raise _Again(answer)
        return answer

    try:
        tried = await policy.run(once, random.Random(),
                                 retryable=lambda exc: isinstance(exc, _Again))
    finally:
        await client.aclose()
    if isinstance(tried.error, _Again):
        answer = tried.error.answer
    elif tried.error is not None:  # not a preflight answer: a bug, not the server
        raise tried.error
    else:
        answer = tried.value
    if not answer.problem:
        return answer.body, []
    tail = f" (after {tried.attempts} attempts)" if answer.retryable and tried.attempts > 1 else ""
    return None, [answer.problem + tail]


def get_json_sync(role: str, url: str, timeout_s: float,
                  headers: Mapping[str, str] | None = None, *,
                  retry: RetryPolicy | Mapping[str, Any] | None = None,
                  valid: Callable[[Any], bool] | None = None) -> tuple[Any, list[str]]:
    """`get_json` from synchronous code, inside a running event loop or not (its own loop, in
    a thread of its own)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, get_json(role, url, timeout_s, headers, retry=retry,
                                                 valid=valid)).result()


def is_model_list(body: Any) -> bool:
    """An OpenAI /models answer: {"data": [{"id": ...}, ...]}, at least one model (vLLM always
    serves one: an empty list is a garbled answer)."""
    data = body.get("data") if isinstance(body, dict) else None
    return bool(data) and isinstance(data, list) and all(isinstance(m, dict) and "id" in m
                                                         for m in data)


async def openai_model_entry(role: str, base_url: str, model: str, *, timeout_s: float = 10.0,
                             api_key: str | None = None,
                             retry: RetryPolicy | Mapping[str, Any] | None = None
                             ) -> tuple[dict[str, Any] | None, list[str]]:
    """`model`'s entry in the endpoint's /models (vLLM's carries `max_model_len`), or the
    problems: down, slow, not OpenAI-compatible, or serving other models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/models"
    body, problems = await get_json(role, url, timeout_s, headers, retry=retry,
                                    valid=is_model_list)
    if problems:
        return None, problems
    try:
        entries = {str(m["id"]): dict(m) for m in body["data"]}
    except (KeyError, TypeError, ValueError):
        return None, [f"{url} is not an OpenAI-compatible model list: {str(body)[:200]}"]
    if model not in entries:
        return None, [f"endpoint {base_url} does not serve model {model!r}; it serves "
                      f"{sorted(entries)}. Set {role}.model to one of them, or restart the "
                      f"server with --served-model-name {model}"]
    return entries[model], []


async def check_openai_endpoint(role: str, base_url: str, model: str, *,
                                timeout_s: float = 10.0, api_key: str | None = None,
                                retry: RetryPolicy | Mapping[str, Any] | None = None
                                ) -> list[str]:
    """The endpoint answers /models in time and serves `model`; one message per problem."""
    return (await openai_model_entry(role, base_url, model, timeout_s=timeout_s,
                                     api_key=api_key, retry=retry))[1]
