"""Torch tier: the `hf` backend with a tiny random transformers Sam3Model on CPU, through the
same HTTP path as the classical tests. Runs when torch, torchvision, transformers >= 5 and
open_clip_torch are installed:

    pip install torch==2.14.1 torchvision==0.29.1 'transformers>=5' open_clip_torch
    pytest -m torch tests/servers
"""

from __future__ import annotations

import numpy as np
import pytest
from sam_harness import png_b64
from sam_scenes import make_scene
from sam_tiny_hf import INSTALL, missing_requirements

from rescue import masks

pytestmark = pytest.mark.torch

MISSING = missing_requirements()
if MISSING:
    pytest.skip(f"torch tier needs {', '.join(MISSING)}: {INSTALL}", allow_module_level=True)

SCENE = make_scene(0)
H, W = SCENE.image.shape[:2]
BOX = [float(v) for v in SCENE.shapes[0].box]
PROMPTS = [{"text": "red rectangle"}, {"box": BOX}, {"text": "shape", "box": BOX},
           {"points": [list(SCENE.shapes[0].centre)], "point_labels": [1]}]


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory):
    from sam_harness import start_server, stop_server

    server = start_server(tmp_path_factory.mktemp("hf"), "--max-instances", "3",
                          backend="sam_tiny_hf:tiny_hf_backend", ready_timeout_s=300)
    yield server
    stop_server(server)


def test_hf_backend_over_http(hf_server) -> None:
    info = hf_server.info()
    assert info["backend"] == "hf" and info["model"] == "tiny-random-sam3"
    assert info["identity"]["transformers"] != "not loaded"
    r = hf_server.post({"image": {"b64": png_b64(SCENE.image)}, "prompts": PROMPTS})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for res in results[:3]:  # text, box, text + box: Sam3Model
        assert res["error"] is None, res
        assert 1 <= len(res["instances"]) <= 3  # threshold 0 keeps queries; capped at 3
        scores = [i["score"] for i in res["instances"]]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        for inst in res["instances"]:
            m = masks.decode(inst["rle"])
            assert m.shape == (H, W)
            assert inst["box"] == (list(masks.bbox(m)) if m.any() else None)
    # no tracker model was given: points are that prompt's error, not the request's
    assert results[3]["instances"] == [] and "Sam3TrackerModel" in results[3]["error"]


def test_vision_features_are_computed_once_and_reused(hf_server) -> None:
    before = hf_server.info()["stats"]["encodes"]
    body = {"image": {"b64": png_b64(make_scene(1).image)}, "prompts": PROMPTS[:3]}
    first = hf_server.post(body).json()
    second = hf_server.post({**body, "image": {"sha256": first["image_sha256"]}}).json()
    assert hf_server.info()["stats"]["encodes"] == before + 1
    assert second["image_cached"] and first["results"] == second["results"]


def test_reused_features_give_the_plain_forward_masks(hf_server) -> None:
    """The server's path (get_vision_features once, then vision_embeds=) must equal a plain
    forward of the same tiny model (same seed) on pixels + text in this process."""
    import torch
    from PIL import Image
    from sam_tiny_hf import tiny_model_and_processor

    image = make_scene(2).image
    served = hf_server.post({"image": {"b64": png_b64(image)},
                             "prompts": [{"text": "red rectangle"}]}).json()["results"][0]

    model, processor = tiny_model_and_processor(seed=0)
    inputs = processor(images=Image.fromarray(image), text="red rectangle", return_tensors="pt")
    with torch.inference_mode():
        out = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"])
    local = processor.post_process_instance_segmentation(
        out, threshold=0.0, mask_threshold=0.5, target_sizes=[[image.shape[0], image.shape[1]]])[0]
    order = np.argsort(-local["scores"].float().numpy(), kind="stable")[:3]
    want = [masks.encode(local["masks"][i].float().numpy() > 0.5) for i in order]
    assert [i["rle"] for i in served["instances"]] == want
    np.testing.assert_allclose([i["score"] for i in served["instances"]],
                               local["scores"].float().numpy()[order], atol=1e-5)
