"""The fault proxy itself: each kind of fault is what a client meets, on GETs and POSTs; the faults
are a function of the seed and the requests, not of their order; it counts what it injected."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter

import httpx
import pytest
from fastapi import FastAPI, Request
from faultproxy import KINDS, FaultPlan, FaultProxy
from standin import ServerThread

ANSWER = {"choices": [{"index": 0, "message": {"content": "yes"}}], "usage": {"n": 3}}


@pytest.fixture(scope="module")
def upstream():
    app = FastAPI()
    seen: list[str] = []

    @app.get("/v1/thing")
    async def thing():
        seen.append("GET")
        return ANSWER

    @app.post("/v1/echo")
    async def echo(request: Request):
        seen.append("POST")
        return {"echo": json.loads(await request.body()), **ANSWER}

    with ServerThread(app) as srv:
        yield srv.url, seen


def _outcome(client: httpx.Client, method: str, path: str, body: dict | None = None) -> str:
    """What the client met: an exception's name, or the status and what the body is."""
    try:
        r = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        return type(exc).__name__
    try:
        data = r.json()
    except ValueError:
        return f"{r.status_code} not-json {len(r.content)}"
    return f"{r.status_code} {json.dumps(data, sort_keys=True)}"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_every_kind_is_what_a_client_meets(upstream, method):
    url, seen = upstream
    path, body = ("/v1/thing", None) if method == "GET" else ("/v1/echo", {"q": 1})
    real = {**ANSWER, "echo": body} if body else ANSWER
    with FaultProxy(url, FaultPlan(hang_s=2.0), script=[*KINDS, None]) as proxy, \
            httpx.Client(base_url=proxy.url, timeout=0.5) as client:
        before = len(seen)
        met = {kind: _outcome(client, method, path, body) for kind in [*KINDS, "none"]}
        r = client.request(method, path, json=body)
        assert r.status_code == 200 and r.json() == real  # past the script: forwarded
        assert proxy.injected == dict.fromkeys(KINDS, 1)
        assert proxy.by_method == {(method, k): 1 for k in KINDS}
        assert proxy.requests[method] == len(KINDS) + 2
    assert met["500"].startswith("500 ") and "injected" in met["500"]
    assert met["503"].startswith("503 ")
    assert met["hang"] == "ReadTimeout"
    assert met["drop"] == "RemoteProtocolError"  # closed without an answer
    assert met["cut"] == "RemoteProtocolError"  # closed before the declared length
    assert met["truncate"].startswith("200 not-json")  # a complete answer, a cut body
    assert met["garbage"].startswith("200 not-json")
    assert met["shape"].startswith("200 ") and met["shape"] != met["none"]
    assert met["none"] == f"200 {json.dumps(real, sort_keys=True)}"
    # the upstream saw the forwarded requests only: cut, truncate, shape, none and the last
    assert len(seen) - before == 5


def test_503_carries_retry_after(upstream):
    url, _ = upstream
    with FaultProxy(url, FaultPlan(retry_after_s=7), script=["503"]) as proxy:
        r = httpx.get(proxy.url + "/v1/thing", timeout=5)
    assert r.status_code == 503 and r.headers["retry-after"] == "7"


def _body(k: int) -> bytes:
    return httpx.Request("POST", "http://x", json={"k": k}).content


def _faults_met(url: str, plan: FaultPlan, order: list[int]) -> tuple[dict[int, str], dict]:
    """Each of 120 distinct POSTs sent once, in `order`, 8 at a time: what each met ("ok" for
    the upstream's answer)."""
    with FaultProxy(url, plan) as proxy:
        async def main():
            sem = asyncio.Semaphore(8)
            async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
                async def one(k):
                    async with sem:
                        try:
                            r = await client.post("/v1/echo", content=_body(k))
                        except httpx.HTTPError as exc:
                            return k, type(exc).__name__
                        if r.status_code == 200 and r.content == json.dumps(
                                {"echo": {"k": k}, **ANSWER}, separators=(",", ":")).encode():
                            return k, "ok"
                        return k, f"{r.status_code} {r.content[:40]!r}"
                return dict(await asyncio.gather(*(one(k) for k in order)))

        met = asyncio.run(main())
        return met, dict(proxy.injected)


def test_faults_depend_on_the_seed_and_the_requests_not_their_order(upstream):
    url, _ = upstream
    plan = FaultPlan.even(0.3, seed=3, hang_s=0.1)  # a hang closes before the client's timeout
    ks = list(range(120))
    shuffled = random.Random(0).sample(ks, len(ks))
    met, injected = _faults_met(url, plan, ks)
    again, injected_again = _faults_met(url, plan, shuffled)
    assert again == met and injected_again == injected
    other, _ = _faults_met(url, FaultPlan.even(0.3, seed=4, hang_s=0.1), ks)
    assert other != met
    drawn = Counter(plan.draw("POST", "/v1/echo", _body(k), 0)[0] for k in ks)
    assert injected == {k: n for k, n in drawn.items() if k is not None}  # counted as drawn
    assert sorted(k for k, m in met.items() if m == "ok") == [
        k for k in ks if plan.draw("POST", "/v1/echo", _body(k), 0)[0] is None]
    assert len(injected) == len(KINDS)


def test_the_rates_are_the_plans():
    plan = FaultPlan(rates={"500": 0.1, "shape": 0.2}, seed=0)
    drawn = Counter(plan.draw("GET", f"/p{k}", b"", 0)[0] for k in range(4000))
    assert abs(drawn["500"] / 4000 - 0.1) < 0.02 and abs(drawn["shape"] / 4000 - 0.2) < 0.02
    assert set(drawn) == {None, "500", "shape"}
    with pytest.raises(ValueError):
        FaultPlan(rates={"500": 0.6, "503": 0.6})


def test_a_retry_of_the_same_request_is_drawn_afresh(upstream):
    """Whether a request fails depends on how often that same request was seen, so a client
    that asks again gets through: with every request of the plan faulted at 50%, ten tries of
    each of 40 requests all end in the real answer."""
    url, _ = upstream
    with FaultProxy(url, FaultPlan.even(0.5, kinds=("500", "garbage", "shape"), seed=1)) \
            as proxy, httpx.Client(base_url=proxy.url, timeout=5) as client:
        for k in range(40):
            for _ in range(10):
                r = client.post("/v1/echo", content=_body(k))
                if r.status_code == 200 and r.content == json.dumps(
                        {"echo": {"k": k}, **ANSWER}, separators=(",", ":")).encode():
                    break
            else:
                raise AssertionError(f"request {k} failed ten times")
        assert sum(proxy.injected.values()) > 10
