"""The SAM server refuses strangers cheaply (issue 14), against a real process on 127.0.0.1:
the token before a byte of the body, a deadline on bodies, a cap on uploads read at once,
the docs and the schema behind the token."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from sam_harness import png_b64
from sam_scenes import make_scene

TOKEN = "s3cret-token"
BODY = {"image": {"b64": png_b64(make_scene(0).image)}, "prompts": [{"box": [20, 20, 120, 100]}]}


def _open_upload(server, declared: int, sent: bytes = b"{", token: str | None = TOKEN
                 ) -> socket.socket:
    """A POST /v1/segment that declares `declared` body bytes and sends only `sent`."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock.sendall(f"POST /v1/segment HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: "
                 f"application/json\r\nContent-Length: {declared}\r\n\r\n".encode() + sent)
    return sock


def _read_until_closed(sock: socket.socket, within_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; fails if it is still open after within_s."""
    sock.settimeout(within_s)
    t0, data = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"connection still open after {within_s} s; got {data[:120]!r}")
    finally:
        sock.close()
    return data, time.monotonic() - t0


def _info(server) -> dict:
    return httpx.get(server.url + "/v1/info", headers=server.headers(), timeout=10).json()


def _wait_for_uploads(server, n: int) -> None:
    deadline = time.monotonic() + 20
    while _info(server)["stats"]["uploads"] != n:
        assert time.monotonic() < deadline, f"stats.uploads never reached {n}"
        time.sleep(0.02)


def test_a_stranger_is_refused_before_the_body_is_read(server_factory) -> None:
    # the body never comes: a server that read it before checking the token would wait for it
    # (until the 60 s body deadline); the 401 must come from the headers alone
    server = server_factory("--token", TOKEN, token=TOKEN)
    for token in (None, "wrong"):
        data, took = _read_until_closed(_open_upload(server, 50_000_000, b"", token), 10)
        assert data.startswith(b"HTTP/1.1 401"), data[:200]
        assert b'"unauthorized"' in data and took < 5
    assert _info(server)["stats"]["unauthorized"] == 2
    assert server.post(BODY).status_code == 200


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/v1/info"])
def test_docs_and_schema_are_behind_the_token(server_factory, path: str) -> None:
    server = server_factory(env={"SAM_SERVER_TOKEN": TOKEN}, token=TOKEN)
    r = httpx.get(server.url + path, timeout=10)
    assert r.status_code == 401 and r.json()["detail"]["code"] == "unauthorized"
    assert httpx.get(server.url + path, headers=server.headers(), timeout=10).status_code == 200
    assert server.health().status_code == 200  # the readiness probe needs no token


def test_a_stalled_body_gets_408_and_its_connection_closed(server_factory) -> None:
    server = server_factory("--body-timeout-s", "1", "--token", TOKEN, token=TOKEN)
    data, took = _read_until_closed(_open_upload(server, 1000), 15)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b'"body_timeout"' in data and 0.8 < took < 10
    # declaring 10 GB (over the limit) and sending one byte: 413 at the deadline, then closed
    data, took = _read_until_closed(_open_upload(server, 10 * 1024 ** 3), 15)
    assert data.startswith(b"HTTP/1.1 413") and b'"body_too_large"' in data, data[:200]
    stats = _info(server)["stats"]
    assert (stats["body_timeouts"], stats["uploads"]) == (1, 0)
    assert server.post(BODY).status_code == 200


def test_concurrent_uploads_are_capped_with_503_and_retry_after(server_factory) -> None:
    server = server_factory("--max-uploads", "1", "--body-timeout-s", "30", "--token", TOKEN,
                            token=TOKEN)
    held = _open_upload(server, 1000)
    try:
        _wait_for_uploads(server, 1)
        r = server.post(BODY)
        assert r.status_code == 503 and r.json()["detail"]["code"] == "overloaded"
        assert r.headers["retry-after"] == "1"
        assert _info(server)["stats"]["rejected_uploads"] == 1
    finally:
        held.close()
    _wait_for_uploads(server, 0)
    assert server.post(BODY).status_code == 200
    info = _info(server)
    assert (info["max_uploads"], info["body_timeout_s"]) == (1, 30.0)


def test_an_eps_upload_is_an_invalid_image(classical_server) -> None:
    import base64

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto 64 64 lineto stroke\n"
    r = classical_server.post({"image": {"b64": base64.b64encode(eps).decode()},
                               "prompts": [{"box": [1, 1, 30, 30]}]})
    assert r.status_code == 422 and r.json()["detail"]["code"] == "invalid_image"
    assert "PNG, JPEG, WEBP, BMP, TIFF" in r.json()["detail"]["message"]
