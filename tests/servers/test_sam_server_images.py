"""Every case of the bad-input image corpus (tests/fixtures/bad_images/, expected outcomes in
its manifest) uploaded to a real SAM server: refused with the loader's reason (413 when too
large, else 422), or decoded to exactly the client loader's pixels (same digest and size)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from rescue.images import decode
from rescue.sample import image_digest

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "bad_images"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_corpus_case_uploaded(classical_server, name: str) -> None:
    want = MANIFEST[name]
    data = (CORPUS / name).read_bytes()
    r = classical_server.post({"image": {"b64": base64.b64encode(data).decode("ascii")},
                               "prompts": [{"box": [0, 0, 2, 2]}]})
    if want["expect"] == "ok":
        assert r.status_code == 200, r.text
        body = r.json()
        h, w, _ = want["shape"]
        assert (body["height"], body["width"]) == (h, w)
        assert body["image_sha256"] == image_digest(decode(data))
        return
    detail = r.json()["detail"]
    if want["expect"] == "image:too_large":
        assert (r.status_code, detail["code"]) == (413, "image_too_large"), r.text
        assert detail["width"] and detail["height"]
    else:
        assert (r.status_code, detail["code"]) == (422, "invalid_image"), r.text
    assert detail["message"].startswith(f"{want['expect']} image.b64: ")
    assert classical_server.health().status_code == 200  # the server is unharmed
