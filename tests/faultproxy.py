"""A fault-injecting HTTP proxy for tests: a real HTTP/1.1 server on 127.0.0.1 that forwards to
one upstream (the vLLM stand-in, the SAM server) and, at set rates, answers in every way a busy
or broken deployment does, on GETs and POSTs alike:

    500       HTTP 500 with an error body (the upstream never sees the request)
    503       HTTP 503 with Retry-After (the upstream never sees the request)
    hang      nothing for `hang_s` (longer than the client's timeout), then the connection closes
    drop      the request read, the connection closed without an answer
    cut       the upstream's 200 declared in full, part of its body sent, the connection closed
    truncate  the upstream's 200 with its body cut short and Content-Length to match: a
              complete HTTP answer whose body is not the JSON it was
    garbage   a 200 that is not JSON (a proxy's error page)
    shape     the upstream's 200 as JSON of the wrong shape (wrapped in a list, emptied, nulled)

The faults are deterministic per seed: whether a request fails, how, and where a body is cut
depend on (seed, method, path, body, how many times that same request was seen), never on
arrival order, so a concurrent client meets the same faults in every run and a retry of the
same request eventually passes. A `script` overrides that for the first requests in arrival
order (unit tests: "garbage, then the real answer"). `injected` counts what it did, by kind and
by method.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

KINDS = ("500", "503", "hang", "drop", "cut", "truncate", "garbage", "shape")
BEFORE = frozenset({"500", "503", "hang", "drop", "garbage"})
"""Faults answered by the proxy itself; the others need the upstream's answer (a 200)."""
HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length",
                 "content-encoding", "host", "te", "trailer", "upgrade", "proxy-connection"})
REASONS = {200: "OK", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass(frozen=True)
class FaultPlan:
    """How often each fault kind is injected: `rates[kind]` of the requests (their sum <= 1)."""

    rates: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0
    hang_s: float = 10.0
    retry_after_s: int = 1

    @classmethod
    def even(cls, rate: float, kinds: Sequence[str] = KINDS, **kw: Any) -> FaultPlan:
        """`rate` of the requests faulted, spread evenly over `kinds`."""
        return cls(rates={k: rate / len(kinds) for k in kinds}, **kw)

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(KINDS)
        if unknown or sum(self.rates.values()) > 1.0 + 1e-9:
            raise ValueError(f"rates must be of {KINDS} and sum to <= 1: {dict(self.rates)}")

    def draw(self, method: str, path: str, body: bytes, seen: int) -> tuple[str | None, bytes]:
        """The fault for this request (None: forward it) and the bytes that shape it."""
        digest = hashlib.sha256(body).hexdigest()
        h = hashlib.sha256(f"{self.seed}|{method}|{path}|{digest}|{seen}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        edge = 0.0
        for kind in KINDS:
            edge += self.rates.get(kind, 0.0)
            if u < edge:
                return kind, h[8:]
        return None, h[8:]


def _shaped(body: bytes, variant: int) -> bytes:
    """The body as JSON of another shape: wrapped in a list, emptied, its lists emptied, or its
    values nulled (a variant that changes nothing falls back to `{}`)."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return b"{}"
    variants = [[data], {}, {k: [] if isinstance(v, list) else v for k, v in data.items()},
                dict.fromkeys(data)]
    out = variants[variant % len(variants)]
    return json.dumps(out if out != data else {}).encode()


@dataclass
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def keep_alive(self) -> bool:
        return not any(k.lower() == "connection" and v.lower() == "close"
                       for k, v in self.headers)


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    line = await reader.readline()
    if not line.strip():
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers: list[tuple[str, str]] = []
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    fields = {k.lower(): v for k, v in headers}
    if fields.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            chunks.append(await reader.readexactly(size))
            await reader.readline()
        body = b"".join(chunks)
    else:
        body = await reader.readexactly(int(fields.get("content-length") or 0))
    return _Request(method.upper(), target, headers, body)


def _head(status: int, headers: Sequence[tuple[str, str]], length: int) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
             *(f"{k}: {v}" for k, v in headers), f"content-length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class FaultProxy:
    """The proxy in a thread of its own (its own event loop); `url` replaces the upstream's."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None,
                 script: Sequence[str | None] = ()):
        self.upstream = upstream.rstrip("/")
        self.plan = plan or FaultPlan()
        self.script = list(script)
        self.injected: Counter[str] = Counter()  # by kind
        self.by_method: Counter[tuple[str, str]] = Counter()  # (method, kind)
        self.requests: Counter[str] = Counter()  # by method, faulted or not
        self._seen: Counter[tuple[str, str, str]] = Counter()
        self._arrived = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.url = ""

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        self._client = httpx.AsyncClient(base_url=self.upstream, timeout=300.0)
        tasks: set[asyncio.Task] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await self._connection(reader, writer)
            except asyncio.CancelledError:
                pass  # the proxy is stopping (asyncio logs a cancelled handler as an error)
            finally:
                tasks.discard(task)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        host, port = server.sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self._ready.set()
        await self._stopping.wait()
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()

    # -- one connection -----------------------------------------------------------------------
    def _decide(self, req: _Request) -> tuple[str | None, bytes]:
        with self._lock:
            k = self._arrived
            self._arrived += 1
            key = (req.method, req.path, hashlib.sha256(req.body).hexdigest())
            seen = self._seen[key]
            self._seen[key] += 1
            self.requests[req.method] += 1
        kind, shape = self.plan.draw(req.method, req.path, req.body, seen)
        if k < len(self.script):
            kind = self.script[k]
        return kind, shape

    def _count(self, method: str, kind: str) -> None:
        with self._lock:
            self.injected[kind] += 1
            self.by_method[(method, kind)] += 1

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                req = await _read_request(reader)
                if req is None or not await self._answer(req, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def _answer(self, req: _Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is to be closed."""
        kind, shape = self._decide(req)
        if kind in BEFORE:
            self._count(req.method, kind)
            return await self._fault(kind, req, writer)
        upstream = await self._client.request(
            req.method, req.target, content=req.body,
            headers=[(k, v) for k, v in req.headers if k.lower() not in HOP])
        headers = [(k, v) for k, v in upstream.headers.multi_items() if k.lower() not in HOP]
        body = upstream.content
        if kind is not None and upstream.status_code == 200 and body:
            self._count(req.method, kind)
            end = len(body.rstrip())  # a cut before trailing blanks only would be whole
            cut = 1 + int.from_bytes(shape[:4], "big") % max(1, end - 1)
            if kind == "cut":
                writer.write(_head(200, headers, len(body)) + body[:cut])
                await writer.drain()
                return False
            body = body[:cut] if kind == "truncate" else _shaped(body, shape[4])
        writer.write(_head(upstream.status_code, headers, len(body)) + body)
        await writer.drain()
        return req.keep_alive

    async def _fault(self, kind: str, req: _Request, writer: asyncio.StreamWriter) -> bool:
        if kind == "drop":
            return False
        if kind == "hang":
            await asyncio.sleep(self.plan.hang_s)
            return False
        if kind == "garbage":
            body = b"<html><body>502 Bad Gateway</body></html>"
            writer.write(_head(200, [("content-type", "application/json")], len(body)) + body)
        else:
            status = int(kind)
            body = json.dumps({"detail": {"code": "injected", "message": f"fault {kind}"},
                               "message": f"fault proxy: injected {kind}"}).encode()
            headers = [("content-type", "application/json")]
            if status == 503:
                headers.append(("retry-after", str(self.plan.retry_after_s)))
            writer.write(_head(status, headers, len(body)) + body)
        await writer.drain()
        return req.keep_alive
