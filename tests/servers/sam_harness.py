"""The SAM server as a real process on 127.0.0.1 (free port): helpers of the tests here.

A module of its own (not conftest.py) so `from sam_harness import ...` can never pick up
another folder's conftest."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_b64(image: np.ndarray) -> str:
    from servers.images import encode_png

    return base64.b64encode(encode_png(image)).decode("ascii")


@dataclass
class RunningServer:
    url: str
    proc: subprocess.Popen
    log: Path
    token: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def post(self, body: dict | None = None, **kw) -> httpx.Response:
        kw.setdefault("timeout", 60)
        headers = {**self.headers(), **kw.pop("headers", {})}
        if body is not None:
            kw["json"] = body
        return httpx.post(self.url + "/v1/segment", headers=headers, **kw)

    def info(self) -> dict:
        r = httpx.get(self.url + "/v1/info", headers=self.headers(), timeout=10)
        r.raise_for_status()
        return r.json()

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=10)


def start_server(log_dir: Path, *args: str, backend: str = "classical", wait_ready: bool = True,
                 env: dict[str, str] | None = None, token: str | None = None,
                 ready_timeout_s: float = 60.0) -> RunningServer:
    port = free_port()
    log = log_dir / f"sam_server_{port}.log"
    full_env = {**os.environ, **(env or {}),
                "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO),
                                               os.environ.get("PYTHONPATH", "")])}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "servers.sam_server", "--backend", backend, "--host",
             "127.0.0.1", "--port", str(port), "--log-level", "warning", *args],
            cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = RunningServer(url=f"http://127.0.0.1:{port}", proc=proc, log=log, token=token)
    deadline = time.monotonic() + ready_timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()}")
        try:
            body = server.health().json()
            if not wait_ready or body.get("ready") or body.get("status") == "error":
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server not up after {ready_timeout_s:g} s:\n{log.read_text()}")
        time.sleep(0.05)


def stop_server(server: RunningServer) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)


@contextmanager
def running_server(log_dir: Path, *args: str, **kw) -> Iterator[RunningServer]:
    """`start_server` for tests that need the server working: one that fails to load raises
    here with its log (not in whatever the test asks next); stopped on exit."""
    server = start_server(log_dir, *args, **kw)
    try:
        if not server.health().json().get("ready"):
            raise RuntimeError(f"server not ready:\n{server.log.read_text()}")
        yield server
    finally:
        stop_server(server)
