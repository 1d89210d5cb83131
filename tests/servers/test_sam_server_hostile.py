"""Hostile requests to the SAM server (a real process) get a 4xx in the protocol envelope."""

from __future__ import annotations

import pytest
from sam_harness import png_b64
from sam_scenes import make_scene

from servers.backends.sam3_hf import Sam3HFBackend
from servers.backends.sam3_meta import Sam3MetaBackend

B64 = png_b64(make_scene(0).image)
HEAD = '{"image": {"b64": "' + B64 + '"}, '
BOX = '"prompts": [{"box": [20, 20, 120, 100]}]'


@pytest.mark.parametrize("body", [
    HEAD + BOX + ', "max_instances": NaN}',          # Python's json writes NaN; pydantic echoes it
    HEAD + BOX + ', "multimask": Infinity}',
    HEAD + '"prompts": [{"points": [[5, 5]], "point_labels": [-Infinity]}]}',
    HEAD + BOX + ', "\\ud800": 1}',                    # a lone surrogate in an unknown key
    HEAD + '"prompts": [{"text": "\\ud800"}]}',        # ... and in a value
], ids=["nan", "inf", "neg_inf", "surrogate_key", "surrogate_value"])
def test_hostile_json_is_a_422_in_the_protocol_envelope(classical_server, body):
    r = classical_server.post(content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text[:300]
    assert r.json()["detail"]["code"] == "invalid_request"


@pytest.mark.parametrize("body", [
    b'{"image": {"b64": "\xff\xfe"}, "prompts": [{"box": [1, 2, 3, 4]}]}',  # not UTF-8
    b"[" * 100_000,                                                        # nested past recursion
], ids=["not_utf8", "deep"])
def test_undecodable_body_is_invalid_request_not_a_bare_400(classical_server, body):
    r = classical_server.post(content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text[:300]
    assert r.json()["detail"]["code"] == "invalid_request"


@pytest.mark.parametrize("cls", [Sam3MetaBackend, Sam3HFBackend])
def test_sam3_identity_names_whether_points_are_served(cls):
    # with enable_points=false a point prompt is an error result, which the client caches:
    # a restart with points enabled must not be served those errors
    on, off = cls(enable_points=True).info().identity, cls(enable_points=False).info().identity
    assert on != off
