"""The model clients' HTTP transport: one pooled aiohttp session per event loop; a request is
bytes out, status + headers + bytes back.

Why aiohttp and not httpx: a study keeps 32+ verifier requests in flight from one process, and
httpcore's pool scans every connection twice per request (a poll() on each idle socket through
anyio's attribute lookup). On this project's 2-core reference machine that made the transport
the largest share of client CPU (benchmarks/bench_transport.py prints both, measured in one run).

Failures come out as this module's own exceptions, so retries, preflight wording and recorded
reasons never depend on which library carried the bytes: `Unreachable` (nothing listens, the
name does not resolve), `Timeout` (connecting or a read took longer than the timeout), `Dropped`
(the connection closed or broke before a whole answer). All are `Fault`s: the request may pass on
a retry. A non-2xx answer is not a fault here; callers read `Response.status_code`.

HTTP(S)_PROXY and .netrc are not read: the model servers are the cluster's own, reached
directly (aiohttp would look them up again on every request, in a worker thread).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

KEEPALIVE_S = 4.0
"""How long an idle connection is kept: under uvicorn's (vLLM's and the SAM server's) 5 s
keep-alive, so the client never reuses a connection the server is closing."""


class Fault(ConnectionError):
    """A request that got no whole answer; it may pass on a retry."""


class Unreachable(Fault):
    """Nothing answered the connection: no server listens there, or the name does not resolve."""


class Timeout(Fault):
    """Connecting, or waiting for the next bytes of the answer, took longer than the timeout."""


class Dropped(Fault):
    """The connection closed or broke mid-request, or the answer was cut short."""


@dataclass(frozen=True)
class Response:
    """A whole HTTP answer, read."""

    status_code: int
    headers: Mapping[str, str]  # case-insensitive, as HTTP headers are
    content: bytes
    reason_phrase: str = ""

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class StatusError(Exception):
    """A non-2xx answer a client raises to its retry loop (`rescue.models.http` reads the
    status and Retry-After from `response`)."""

    def __init__(self, message: str, response: Response):
        super().__init__(message)
        self.response = response


class HttpClient:
    """Requests to one server over a keep-alive pool of at most `max_connections`.

    The session belongs to the event loop that first used it; a client used from a new loop
    (each `asyncio.run` of a test or a mode) opens a new one. `timeout_s` bounds connecting and
    each wait for bytes (as httpx's timeout did), not the whole answer: a long generation that
    streams nothing for `timeout_s` is a `Timeout`, one that is merely long is not.
    """

    def __init__(self, base_url: str, *, timeout_s: float,
                 headers: Mapping[str, str] | None = None, max_connections: int = 100):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.headers = dict(headers or {})
        self.max_connections = int(max_connections)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop:
            if self._session is not None:
                _abandon(self._session)
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0,
                                             keepalive_timeout=KEEPALIVE_S)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self.headers, cookie_jar=aiohttp.DummyCookieJar(),
                timeout=self._timeout(self.timeout_s))
            self._loop = loop
        return self._session

    @staticmethod
    def _timeout(seconds: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds)

    async def post(self, path: str, body: bytes, *, timeout_s: float | None = None,
                   content_type: str = "application/json") -> Response:
        return await self.request("POST", path, body, timeout_s=timeout_s,
                                  content_type=content_type)

    async def get(self, path: str, *, timeout_s: float | None = None) -> Response:
        return await self.request("GET", path, timeout_s=timeout_s)

    async def request(self, method: str, path: str, body: bytes | None = None, *,
                      timeout_s: float | None = None,
                      content_type: str = "application/json") -> Response:
        """One request, not retried: the whole answer whatever its status, or a `Fault`."""
        url = self.base_url + path
        headers = {"Content-Type": content_type} if body is not None else None
        options = {"timeout": self._timeout(timeout_s)} if timeout_s is not None else {}
        try:
            async with self.session().request(method, url, data=body, headers=headers,
                                              **options) as resp:
                content = await resp.read()
                return Response(resp.status, resp.headers, content, resp.reason or "")
        except aiohttp.ClientConnectorDNSError as exc:
            raise Unreachable(f"{method} {url}: cannot resolve the host ({exc})") from exc
        except aiohttp.ClientConnectorError as exc:
            raise Unreachable(f"{method} {url}: connection refused or unreachable "
                              f"({exc.os_error or exc})") from exc
        except asyncio.TimeoutError as exc:  # aiohttp's own timeouts subclass it
            raise Timeout(f"{method} {url}: no answer within {timeout_s or self.timeout_s:g} s"
                          ) from exc
        except aiohttp.ClientError as exc:
            raise Dropped(f"{method} {url}: {type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            if self._loop is asyncio.get_running_loop():
                await self._session.close()
            else:
                _abandon(self._session)
            self._session = None
            self._loop = None

    def __del__(self) -> None:
        if self._session is not None:
            _abandon(self._session)


def _abandon(session: aiohttp.ClientSession) -> None:
    """Drop a session nobody will close on its own event loop (that loop has ended, or the
    client is going away): its sockets are closed at once, nothing is left to await, and
    aiohttp does not warn about an unclosed session."""
    connector = session.connector
    session.detach()
    if connector is not None and not connector.closed:
        # close()'s synchronous part (the awaitable rest needs the loop); where that loop has
        # closed too (the garbage collector came late) the transports cannot schedule their
        # close, and their sockets go with them
        with contextlib.suppress(RuntimeError):
            connector._close()
