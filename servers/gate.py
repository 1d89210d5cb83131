"""What a request passes before the app sees it: the token, an upload slot, a body deadline and
the size limit, in that order.

A pure ASGI middleware, outermost, so a stranger costs one header comparison: the token is
checked before a byte of the body is read (FastAPI would parse the body before a dependency
could refuse it), on every path but /health, the docs and /openapi.json included. Bodies are
read only in one of `max_uploads` slots (the rest get 503 at once: memory for bodies is bounded
by slots × limit, however many connections arrive) and within `timeout_s` from the first byte
asked for: a client that declares a large body and sends one byte gets 408 and its slot back,
instead of holding both forever. A body over `limit` is drained, not stored, so an honest
client reads the 413 rather than a reset mid-upload; the drain has the same deadline.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from servers.errors import ApiError

OPEN_PATHS = frozenset({"/health"})
"""Paths served without the token: the launchers' readiness probe."""

BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})

CLOSE = {"Connection": "close"}
"""On every refusal here: the body was not (all) read, so the connection cannot carry another
request, and a stranger's connection is not kept alive either."""


@dataclass
class GateStats:
    """Counters of the gate, reported in /v1/info `stats`."""

    uploads: int = 0            # bodies being read now
    rejected_uploads: int = 0   # 503: every upload slot was taken
    body_timeouts: int = 0      # 408: the body did not arrive within the deadline
    unauthorized: int = 0       # 401


@dataclass(frozen=True)
class GateSettings:
    token: str | None
    limit: int
    timeout_s: float
    max_uploads: int
    retry_after_s: int


def _authorized(scope: dict, token: str) -> bool:
    given = b""
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            if scheme.lower() == b"bearer":
                given = credentials.strip()
            break
    return hmac.compare_digest(given, token.encode())


class Gate:
    """The middleware (see the module docstring); `stats` is shared with the app's /v1/info."""

    def __init__(self, app: Callable[..., Awaitable[None]], settings: GateSettings,
                 stats: GateStats) -> None:
        self.app, self.settings, self.stats = app, settings, stats

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        if scope["method"] in BODYLESS:
            await self.app(scope, receive, send)
            return
        self.stats.uploads += 1
        try:
            outcome = await self._read(scope, receive)
        finally:
            self.stats.uploads -= 1
        if outcome is None:  # the client went away
            return
        if isinstance(outcome, ApiError):
            await outcome.response()(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": outcome, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _refusal(self, scope: dict) -> ApiError | None:
        """401 for a stranger, 503 when every upload slot is taken; decided from the headers."""
        s = self.settings
        if s.token is not None and scope["path"] not in OPEN_PATHS and not _authorized(
                scope, s.token):
            self.stats.unauthorized += 1
            return ApiError(401, "unauthorized", "missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer", **CLOSE})
        if scope["method"] not in BODYLESS and self.stats.uploads >= s.max_uploads:
            self.stats.rejected_uploads += 1
            return ApiError(503, "overloaded", f"{self.stats.uploads} request bodies are being "
                            "read: retry later",
                            headers={"Retry-After": str(s.retry_after_s), **CLOSE},
                            retry_after=s.retry_after_s)
        return None

    async def _read(self, scope: dict, receive: Callable) -> bytes | ApiError | None:
        """The whole body; an ApiError (413, 408) to answer instead; None on disconnect."""
        s = self.settings
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > s.limit
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.timeout_s
        body = bytearray()
        more = True
        complete = False
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                if too_big:
                    break  # drained long enough: answer the 413 it deserves
                self.stats.body_timeouts += 1
                return ApiError(408, "body_timeout", f"request body not received within "
                                f"{s.timeout_s:g} s ({len(body)} bytes arrived)",
                                headers=CLOSE, timeout_s=s.timeout_s)
            if message["type"] == "http.disconnect":
                return None
            if not too_big:
                body += message.get("body", b"")
                too_big = len(body) > s.limit
                if too_big:
                    body = bytearray()
            more = message.get("more_body", False)
            complete = not more
        if too_big:
            return ApiError(413, "body_too_large",
                            f"request body over the limit of {s.limit} bytes",
                            headers={} if complete else CLOSE, limit=s.limit)
        return bytes(body)
