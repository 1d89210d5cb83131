"""Client CPU per request of the clients' transport (rescue/models/transport.py, aiohttp) and of
an httpx AsyncClient as the clients used it before (one pool, max_concurrency + 4 connections),
measured in one run against the same cheap asyncio HTTP/1.1 server in this process.

    python benchmarks/bench_transport.py [--requests 2000] [--in-flight 32] [--latency 0.05]

Each request posts a ~20 kB JSON body (a verdict's image) and reads a ~1.6 kB answer after
--latency seconds, --in-flight at a time under a semaphore, as `Endpoint` runs them. CPU is
this process's (the server's share is the same for both); wall shows whether the client kept
up (ideal: requests x latency / in-flight). Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BODY = json.dumps({"choices": [{"index": 0, "finish_reason": "stop", "message": {
    "role": "assistant", "content": "x" * 1500}}], "usage": {"prompt_tokens": 1}}).encode()
REQUEST = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
    "url": "data:image/jpeg;base64," + "A" * 20000}}]}]}).encode()


def serve(latency: float):
    answer = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
              % len(BODY)) + BODY

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                size = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                             if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(size)
                await asyncio.sleep(latency)
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        writer.close()

    return asyncio.start_server(handle, "127.0.0.1", 0)


async def timed(post, requests: int, in_flight: int) -> tuple[float, float]:
    sem = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with sem:
            await post()

    c0, w0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    return time.process_time() - c0, time.perf_counter() - w0


async def main(args: argparse.Namespace) -> None:
    import httpx

    from rescue.models.transport import HttpClient

    server = await serve(args.latency)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    limit = args.in_flight + 4
    ours = HttpClient(url, timeout_s=30, max_connections=limit)
    theirs = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=limit,
                                                                max_keepalive_connections=limit))

    async def post_ours() -> None:
        assert (await ours.post("/v1/chat/completions", REQUEST)).status_code == 200

    async def post_httpx() -> None:
        r = await theirs.post(url + "/v1/chat/completions", content=REQUEST,
                              headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.content

    for post in (post_ours, post_httpx):  # warm: connections open, code paths loaded
        await timed(post, 4 * args.in_flight, args.in_flight)
    rows = {}
    ours_name = "aiohttp (rescue transport)"
    for name, post in ((ours_name, post_ours), ("httpx", post_httpx),
                       (ours_name + " again", post_ours), ("httpx again", post_httpx)):
        rows[name] = await timed(post, args.requests, args.in_flight)
    await ours.aclose()
    await theirs.aclose()
    server.close()
    ideal = args.requests * args.latency / args.in_flight
    print(f"RESCue transport, {time.strftime('%Y-%m-%d')}, {platform.machine()} "
          f"{os.cpu_count()} cores: {args.requests} requests, {args.in_flight} in flight, "
          f"server latency {args.latency:g} s (ideal wall {ideal:.1f} s)")
    print("| client | CPU ms/request | wall s |\n|---|---|---|")
    for name, (cpu, wall) in rows.items():
        print(f"| {name} | {cpu / args.requests * 1e3:.3f} | {wall:.2f} |")
    best = {k: min(rows[k][0], rows[k + " again"][0]) for k in (ours_name, "httpx")}
    print(f"httpx / rescue transport, CPU per request (best of two): "
          f"{best['httpx'] / best[ours_name]:.1f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--in-flight", type=int, default=32)
    ap.add_argument("--latency", type=float, default=0.05)
    asyncio.run(main(ap.parse_args()))
