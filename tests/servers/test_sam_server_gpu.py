"""GPU tier: Meta's `sam3` backend through the HTTP server on a CUDA/ROCm GPU, with randomly
initialised weights (`load_from_hf=false`: nothing downloaded). Random weights say nothing
about mask quality; this checks that every prompt kind runs through the real sam3 API (text,
box, text + box, points, multimask) and that the image is encoded once. Runs where
`pip install -e '.[sam3]'` and a GPU are available:

    pytest -m gpu tests/servers
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from sam_harness import png_b64, start_server, stop_server
from sam_scenes import iou, make_scene

from rescue import masks

pytestmark = pytest.mark.gpu


def _why_not() -> str | None:
    for mod in ("torch", "sam3", "open_clip"):
        if importlib.util.find_spec(mod) is None:
            return f"needs {mod}: pip install -e '.[sam3]' (torch for your GPU first)"
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA/ROCm GPU"
    return None


REASON = _why_not()
if REASON:
    pytest.skip(f"GPU tier: {REASON}", allow_module_level=True)

SCENE = make_scene(0)
H, W = SCENE.image.shape[:2]
S0 = SCENE.shapes[0]
BOX = [float(v) for v in S0.box]


@pytest.fixture(scope="module")
def sam3_server(tmp_path_factory):
    # random weights score every query near 0 (often exactly 0 after sigmoid x presence):
    # a negative threshold keeps all of them, so every concept prompt returns max_instances
    server = start_server(tmp_path_factory.mktemp("sam3"), "-o", "device=cuda", "-o",
                          "load_from_hf=false", "-o", "confidence_threshold=-1.0",
                          "--max-instances", "4", backend="sam3", ready_timeout_s=600)
    yield server
    stop_server(server)


def _check_instances(res: dict, at_most: int) -> None:
    assert res["error"] is None, res
    assert 1 <= len(res["instances"]) <= at_most
    scores = [i["score"] for i in res["instances"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    for inst in res["instances"]:
        m = masks.decode(inst["rle"])
        assert m.shape == (H, W)
        assert inst["box"] == (list(masks.bbox(m)) if m.any() else None)


def test_every_prompt_kind_runs(sam3_server) -> None:
    info = sam3_server.info()
    assert info["backend"] == "sam3" and info["device"] == "cuda"
    assert info["capabilities"] == {"text": True, "box": True, "points": True, "multimask": True}
    prompts = [{"text": "red rectangle"}, {"box": BOX}, {"text": "shape", "box": BOX},
               {"points": [list(S0.centre)], "point_labels": [1]},
               {"points": [list(S0.centre), [2.0, 2.0]], "point_labels": [1, 0], "box": BOX}]
    r = sam3_server.post({"image": {"b64": png_b64(SCENE.image)}, "prompts": prompts})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    for i in (0, 2):  # concept prompts (text, text + box exemplar): max_instances of 200
        _check_instances(res[i], 4)
        assert len(res[i]["instances"]) == 4
    for i in (1, 3, 4):  # interactive prompts (a box without text, points): the best mask
        _check_instances(res[i], 1)
    assert sam3_server.info()["stats"]["encodes"] == 1


def test_multimask_and_reuse(sam3_server) -> None:
    body = {"image": {"b64": png_b64(make_scene(1).image)}, "multimask": True,
            "prompts": [{"points": [[40.0, 40.0]], "point_labels": [1]}]}
    before = sam3_server.info()["stats"]["encodes"]
    first = sam3_server.post(body).json()
    _check_instances(first["results"][0], 4)
    assert len(first["results"][0]["instances"]) == 3  # SAM's three candidate masks
    again = sam3_server.post({**body, "image": {"sha256": first["image_sha256"]}}).json()
    assert again["image_cached"] and again["results"] == first["results"]
    assert sam3_server.info()["stats"]["encodes"] == before + 1


def test_batched_prompts_match_one_prompt_at_a_time() -> None:
    """The sam3 backend's batched path (one forward_grounding for n phrases, one predict_inst
    for n boxes or clicks) against -o max_batch=1 on the same random weights (one model, so
    the same weights). float32: a batch may change float rounding, never the masks beyond a
    few pixels near the threshold; concept instances are matched by IoU since random weights
    tie many scores."""
    from rescue.hypothesis import Prompt
    from servers.backends.base import SegmentOptions
    from servers.backends.sam3_meta import Sam3MetaBackend

    backend = Sam3MetaBackend(device="cuda", load_from_hf=False, confidence_threshold=-1.0,
                              dtype="float32", max_batch=1)
    backend.load()
    state = backend.encode(SCENE.image)
    (b0, b1), (c0, c1) = ([tuple(float(v) for v in getattr(s, k)) for s in SCENE.shapes[:2]]
                          for k in ("box", "centre"))
    prompts = [Prompt(text="red rectangle"), Prompt(text="blue ellipse"),
               Prompt(text="shape", box=b0), Prompt(text="thing", box=b1), Prompt(box=b0),
               Prompt(box=b1), Prompt(points=(c0,), point_labels=(1,)),
               Prompt(points=(c1,), point_labels=(1,)),
               Prompt(box=b0, points=(c0, c1), point_labels=(1, 0)),
               Prompt(box=b1, points=(c1, c0), point_labels=(1, 0))]
    options = SegmentOptions(max_instances=4)
    alone = [backend.segment(state, [p], options)[0] for p in prompts]
    backend.max_batch = 16
    batched = backend.segment(state, prompts, options)
    for p, a, b in zip(prompts, alone, batched, strict=True):
        assert a.error is None and b.error is None, (p, a.error, b.error)
        assert len(a.instances) == len(b.instances) >= 1, p
        np.testing.assert_allclose(sorted(x.score for x in b.instances),
                                   sorted(x.score for x in a.instances), atol=1e-3)
        ours = [masks.decode(x.rle) for x in a.instances]
        for y in b.instances:
            best = max(iou(masks.decode(y.rle), o) for o in ours)
            assert best >= 0.98, (p, best)
