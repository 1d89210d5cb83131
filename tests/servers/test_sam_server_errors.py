"""Every refusal of the SAM server, against a real process: 401, 404 (see the HTTP tests), 413,
422, 500, 503 (overload and not ready), each with its machine-readable `detail.code`."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from sam_harness import png_b64
from sam_scenes import make_scene

from servers.images import encode_png

SCENE = make_scene(0)
B64 = png_b64(SCENE.image)
BOX = [20.0, 20.0, 120.0, 100.0]


def _code(r: httpx.Response) -> str:
    return r.json()["detail"]["code"]


# -- 401 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["flag", "env"])
def test_token_required_on_v1_not_on_health(server_factory, how: str) -> None:
    token = "s3cret-token"
    if how == "flag":
        server = server_factory("--token", token)
    else:
        server = server_factory(env={"SAM_SERVER_TOKEN": token})
    body = {"image": {"b64": B64}, "prompts": [{"box": BOX}]}

    r = httpx.post(server.url + "/v1/segment", json=body, timeout=30)
    assert r.status_code == 401 and _code(r) == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(server.url + "/v1/segment", json=body, timeout=30,
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(server.url + "/v1/info", timeout=10).status_code == 401
    assert server.health().status_code == 200  # probes need no token

    ok = httpx.post(server.url + "/v1/segment", json=body, timeout=30,
                    headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and ok.json()["results"][0]["instances"]


# -- 413 -------------------------------------------------------------------------------------

def test_body_over_the_limit_is_413(server_factory) -> None:
    server = server_factory("--max-body-bytes", "20000")
    big = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)  # ~58 KB
    r = server.post({"image": {"b64": png_b64(big)}, "prompts": [{"box": BOX}]})
    assert r.status_code == 413 and _code(r) == "body_too_large"
    assert r.json()["detail"]["limit"] == 20000
    # the same server still answers a small request
    small = np.zeros((32, 32, 3), np.uint8)
    assert server.post({"image": {"b64": png_b64(small)},
                        "prompts": [{"box": [1, 1, 20, 20]}]}).status_code == 200


def test_image_over_the_pixel_or_side_limit_is_413(server_factory) -> None:
    server = server_factory("--max-image-pixels", "20000", "--max-image-side", "150")
    r = server.post({"image": {"b64": B64}, "prompts": [{"box": BOX}]})  # 320x240
    assert r.status_code == 413 and _code(r) == "image_too_large"
    d = r.json()["detail"]
    assert (d["width"], d["height"], d["limit_pixels"]) == (320, 240, 20000)
    tall = np.zeros((160, 10, 3), np.uint8)  # 1600 px, but a side of 160 > 150
    r = server.post({"image": {"b64": png_b64(tall)}, "prompts": [{"box": [1, 1, 5, 9]}]})
    assert r.status_code == 413 and _code(r) == "image_too_large"


def test_too_many_prompts_is_413(server_factory) -> None:
    server = server_factory("--max-prompts", "4")
    r = server.post({"image": {"b64": B64}, "prompts": [{"box": BOX}] * 5})
    assert r.status_code == 413 and _code(r) == "too_many_prompts"
    assert (r.json()["detail"]["count"], r.json()["detail"]["limit"]) == (5, 4)
    assert server.post({"image": {"b64": B64}, "prompts": [{"box": BOX}] * 4}).status_code == 200


# -- 422 -------------------------------------------------------------------------------------

NOT_AN_IMAGE = base64.b64encode(b"this is not an image at all").decode()
TRUNCATED_PNG = base64.b64encode(encode_png(SCENE.image)[:200]).decode()


@pytest.mark.parametrize(("body", "code", "needle"), [
    ({"image": {"b64": B64}}, "invalid_request", "prompts"),
    ({"image": {"b64": B64}, "prompts": []}, "invalid_request", "prompts"),
    ({"image": {"b64": B64, "sha256": "a" * 64}, "prompts": [{"box": BOX}]}, "invalid_request",
     "exactly one"),
    ({"image": {}, "prompts": [{"box": BOX}]}, "invalid_request", "exactly one"),
    ({"image": {"sha256": "xyz"}, "prompts": [{"box": BOX}]}, "invalid_request", "sha256"),
    ({"image": {"b64": B64}, "prompts": [{"box": "wide"}]}, "invalid_request", "box"),
    ({"image": {"b64": B64}, "prompts": [{"bbox": BOX}]}, "invalid_request", "bbox"),
    ({"image": {"b64": B64}, "prompts": [{"box": BOX}], "max_instances": 0}, "invalid_request",
     "max_instances"),
    ({"image": {"b64": "@@@not base64@@@"}, "prompts": [{"box": BOX}]}, "invalid_image", "base64"),
    ({"image": {"b64": NOT_AN_IMAGE}, "prompts": [{"box": BOX}]}, "invalid_image",
     "image:unsupported"),
    ({"image": {"b64": TRUNCATED_PNG}, "prompts": [{"box": BOX}]}, "invalid_image",
     "image:corrupt"),
    ({"image": {"b64": B64}, "prompts": [{}]}, "invalid_prompts", "empty prompt"),
    ({"image": {"b64": B64}, "prompts": [{"box": [1, 2, 3]}]}, "invalid_prompts", "4 numbers"),
    ({"image": {"b64": B64}, "prompts": [{"box": [100, 20, 50, 90]}]}, "invalid_prompts",
     "x2 > x1"),
    ({"image": {"b64": B64}, "prompts": [{"box": [10, 10, 900, 90]}]}, "invalid_prompts",
     "outside"),
    ({"image": {"b64": B64}, "prompts": [{"box": [-200, -200, -100, -100]}]}, "invalid_prompts",
     "outside"),
    ({"image": {"b64": B64}, "prompts": [{"points": [[5, 5]], "point_labels": [1, 0]}]},
     "invalid_prompts", "point_labels"),
    ({"image": {"b64": B64}, "prompts": [{"points": [[5, 5]], "point_labels": [2]}]},
     "invalid_prompts", "point_labels"),
    ({"image": {"b64": B64}, "prompts": [{"points": [[5, 5, 5]], "point_labels": [1]}]},
     "invalid_prompts", "[x, y]"),
    ({"image": {"b64": B64}, "prompts": [{"points": [[5000, 5]], "point_labels": [1]}]},
     "invalid_prompts", "outside"),
])
def test_malformed_requests_are_422(classical_server, body: dict, code: str,
                                    needle: str) -> None:
    r = classical_server.post(body)
    assert r.status_code == 422, r.text
    assert _code(r) == code
    assert needle in r.text
    assert len(r.content) < 20000  # never echoes the image back


@pytest.mark.parametrize("raw", [
    '{"image": {"b64": "%s"}, "prompts": [{"box": [NaN, 1, 50, 50]}]}',
    '{"image": {"b64": "%s"}, "prompts": [{"box": [1, 1, Infinity, 50]}]}',
    '{"image": {"b64": "%s"}, "prompts": [{"points": [[NaN, 3]], "point_labels": [1]}]}',
])
def test_non_finite_coordinates_are_422(classical_server, raw: str) -> None:
    # JSON has no NaN, but Python's json (and many clients) write it: it must not pass
    r = classical_server.post(content=(raw % B64).encode(),
                              headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert _code(r) in ("invalid_prompts", "invalid_request")
    assert "finite" in r.text or "NaN" in r.text or "inf" in r.text.lower()


def test_not_json_is_422(classical_server) -> None:
    r = classical_server.post(content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and _code(r) == "invalid_request"


def test_strict_422_lists_every_invalid_prompt(classical_server) -> None:
    r = classical_server.post({"image": {"b64": B64}, "prompts": [
        {"box": BOX}, {"box": [9, 9, 1, 1]}, {"box": BOX}, {}]})
    assert r.status_code == 422
    assert [e["index"] for e in r.json()["detail"]["errors"]] == [1, 3]


# -- 500 -------------------------------------------------------------------------------------

def test_backend_failure_is_500_and_server_survives(server_factory) -> None:
    server = server_factory("-o", "segment_error=CUDA out of memory",
                            backend="sam_fakes:BoxBackend")
    r = server.post({"image": {"b64": B64}, "prompts": [{"box": BOX}]})
    assert r.status_code == 500 and _code(r) == "backend_error"
    assert "out of memory" in r.json()["detail"]["message"]
    assert server.health().json()["ready"] is True


def test_failed_load_is_reported_by_health_and_segment(server_factory) -> None:
    server = server_factory("-o", "load_error=no weights at /nope", backend="sam_fakes:BoxBackend")
    h = server.health()
    assert h.status_code == 503
    assert h.json()["status"] == "error" and "no weights" in h.json()["error"]
    r = server.post({"image": {"b64": B64}, "prompts": [{"box": BOX}]})
    assert r.status_code == 503 and _code(r) == "not_ready"
    assert "no weights" in r.json()["detail"]["message"]


# -- 503 -------------------------------------------------------------------------------------

def test_not_ready_while_loading(server_factory, tmp_path: Path) -> None:
    gate = tmp_path / "loaded"
    server = server_factory("-o", f"load_gate={gate}", backend="sam_fakes:BoxBackend",
                            wait_ready=False)
    assert server.health().json() == {"status": "loading", "backend": "fake", "ready": False,
                                      "error": None}
    r = server.post({"image": {"b64": B64}, "prompts": [{"box": BOX}]})
    assert r.status_code == 503 and _code(r) == "not_ready"
    assert r.headers["retry-after"] == "1"
    gate.touch()
    deadline = time.monotonic() + 30
    while not server.health().json()["ready"]:
        assert time.monotonic() < deadline, "never became ready"
        time.sleep(0.05)
    assert server.post({"image": {"b64": B64}, "prompts": [{"box": BOX}]}).status_code == 200


def _wait_for_stat(server, key: str, value: int) -> None:
    deadline = time.monotonic() + 30
    while server.info()["stats"][key] != value:
        assert time.monotonic() < deadline, f"stats.{key} never reached {value}"
        time.sleep(0.02)


def test_overload_is_503_not_an_unbounded_queue(server_factory, tmp_path: Path) -> None:
    gate = tmp_path / "go"
    server = server_factory("--max-in-flight", "1", "--max-queued", "1", "-o",
                            f"segment_gate={gate}", backend="sam_fakes:BoxBackend")
    body = {"image": {"b64": B64}, "prompts": [{"box": BOX}]}
    results: dict[str, httpx.Response] = {}

    def send(name: str) -> None:
        results[name] = server.post(body)

    first = threading.Thread(target=send, args=("running",))
    first.start()
    _wait_for_stat(server, "in_flight", 1)   # blocked inside the backend
    second = threading.Thread(target=send, args=("queued",))
    second.start()
    _wait_for_stat(server, "queued", 1)      # waiting for the slot

    r = server.post(body)                    # one more: no room left
    assert r.status_code == 503 and _code(r) == "overloaded"
    assert r.headers["retry-after"] == "1"
    assert server.info()["stats"]["rejected_overload"] == 1

    gate.touch()
    first.join(30)
    second.join(30)
    assert results["running"].status_code == 200
    assert results["queued"].status_code == 200
    stats = server.info()["stats"]
    assert (stats["in_flight"], stats["queued"]) == (0, 0)
    assert server.post(body).status_code == 200
