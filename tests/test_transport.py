"""The clients' transport (rescue/models/transport.py) against a real server behind the fault
proxy: every fault a client can meet comes out as the transport's own exception (what retries
and preflight wording read), answers of any status come back whole, one session per event loop,
and a session left on an ended loop is dropped without aiohttp's unclosed-session warning."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import warnings

import pytest
from fastapi import FastAPI, Request
from faultproxy import KINDS, FaultPlan, FaultProxy
from standin import ServerThread

from rescue.models.http import is_retryable
from rescue.models.transport import Dropped, HttpClient, Timeout, Unreachable

ANSWER = {"choices": [{"index": 0, "message": {"content": "yes"}}]}


@pytest.fixture(scope="module")
def upstream():
    app = FastAPI()

    @app.post("/v1/echo")
    async def echo(request: Request):
        return {"echo": json.loads(await request.body()),
                "auth": request.headers.get("authorization"),
                "type": request.headers.get("content-type"), **ANSWER}

    with ServerThread(app) as srv:
        yield srv.url


def _met(client: HttpClient, body: bytes) -> str:
    async def go():
        try:
            r = await client.post("/v1/echo", body)
        except (Timeout, Dropped, Unreachable) as exc:
            return type(exc).__name__
        try:
            json.loads(r.content)
        except ValueError:
            return f"{r.status_code} not-json"
        return f"{r.status_code} json"

    return asyncio.run(go())


def test_every_fault_is_the_transports_own_exception(upstream):
    body = json.dumps({"q": 1}).encode()
    with FaultProxy(upstream, FaultPlan(hang_s=2.0), script=[*KINDS, None]) as proxy:
        client = HttpClient(proxy.url, timeout_s=0.5, headers={"Authorization": "Bearer t"})
        met = {kind: _met(client, body) for kind in [*KINDS, "none"]}
        assert proxy.injected == dict.fromkeys(KINDS, 1)
    assert met["500"] == "500 json" and met["503"] == "503 json"  # answers, not faults
    assert met["hang"] == "Timeout"
    assert met["drop"] == "Dropped"  # closed without an answer
    assert met["cut"] == "Dropped"  # closed before the declared length
    assert met["truncate"] == "200 not-json" and met["garbage"] == "200 not-json"
    assert met["shape"] == "200 json" and met["none"] == "200 json"
    assert all(is_retryable(e("x")) for e in (Timeout, Dropped, Unreachable))


def test_an_answer_comes_back_whole_with_the_clients_headers(upstream):
    client = HttpClient(upstream, timeout_s=5, headers={"Authorization": "Bearer t"})

    async def go():
        try:
            return await client.post("/v1/echo", b'{"q": [1, 2]}')
        finally:
            await client.aclose()

    r = asyncio.run(go())
    got = json.loads(r.content)
    assert r.status_code == 200 and r.headers.get("CONTENT-TYPE") == "application/json"
    assert got["echo"] == {"q": [1, 2]} and got["auth"] == "Bearer t"
    assert got["type"] == "application/json"


def test_nothing_listening_is_unreachable_and_sessions_follow_the_event_loop(recwarn):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    clients = [HttpClient(f"http://127.0.0.1:{port}", timeout_s=2)]
    sessions = []

    async def go():
        with pytest.raises(Unreachable, match="refused"):
            await clients[0].get("/v1/info")
        sessions.append(clients[0].session())

    warnings.simplefilter("always")
    asyncio.run(go())
    asyncio.run(go())  # a new loop: a new session; the first is dropped
    assert sessions[0] is not sessions[1] and sessions[0].closed
    clients.clear()  # the client goes away holding the second loop's session
    gc.collect()
    assert not [w for w in recwarn if "Unclosed" in str(w.message)]


def test_a_session_whose_loop_has_closed_is_dropped_quietly():
    """The garbage collector may drop a client after its loop closed (a test that never
    awaited `aclose`): a kept-alive transport then cannot schedule its close, and raises
    "Event loop is closed" from `__del__` (seen once in the suite). `_abandon` drops it."""
    from rescue.models import transport

    class ClosedLoopConnector:
        closed = False

        def _close(self):
            raise RuntimeError("Event loop is closed")

    class Session:
        connector = ClosedLoopConnector()
        detached = False

        def detach(self):
            self.detached = True

    session = Session()
    transport._abandon(session)  # type: ignore[arg-type]
    assert session.detached
