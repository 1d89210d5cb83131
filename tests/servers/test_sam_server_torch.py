"""Torch tier: the `hf` backend with a tiny random transformers Sam3Model on CPU, through the
same HTTP path as the classical tests: built in memory (concept prompts against a plain
forward), and loaded from a saved folder as a deployment loads `facebook/sam3` (the tracker
built to the checkpoint's sizes; every prompt mode of the client). Runs when torch,
torchvision, transformers >= 5 and open_clip_torch are installed:

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
CENTRE = [float(v) for v in SCENE.shapes[0].centre]
CONCEPT = [{"text": "red rectangle"}, {"text": "shape", "box": BOX}]  # Sam3Model
INTERACTIVE = [{"box": BOX}, {"points": [CENTRE], "point_labels": [1]},  # Sam3TrackerModel
               {"box": BOX, "points": [CENTRE], "point_labels": [1]},
               {"text": "shape", "box": BOX, "points": [CENTRE], "point_labels": [1]}]
PROMPTS = CONCEPT + INTERACTIVE


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
    for res in results[:len(CONCEPT)]:  # text, text + box: Sam3Model
        assert res["error"] is None, res
        assert 1 <= len(res["instances"]) <= 3  # threshold 0 keeps queries; capped at 3
        scores = [i["score"] for i in res["instances"]]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        for inst in res["instances"]:
            m = masks.decode(inst["rle"])
            assert m.shape == (H, W)
            assert inst["box"] == (list(masks.bbox(m)) if m.any() else None)
    # no tracker model was given: interactive prompts are each that prompt's error, not the
    # request's, and the server says it cannot take them
    for res in results[len(CONCEPT):]:
        assert res["instances"] == [] and "Sam3TrackerModel" in res["error"]
    assert info["capabilities"] == {"text": True, "box": False, "points": False,
                                    "multimask": False}


def test_vision_features_are_computed_once_and_reused(hf_server) -> None:
    before = hf_server.info()["stats"]["encodes"]
    body = {"image": {"b64": png_b64(make_scene(1).image)}, "prompts": CONCEPT}
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


# --- loaded from a saved folder, as a deployment loads facebook/sam3 ----------------------------


@pytest.fixture(scope="module")
def sam3_folder(tmp_path_factory):
    from sam_tiny_hf import save_tiny_sam3

    return save_tiny_sam3(tmp_path_factory.mktemp("tiny_sam3"))


@pytest.fixture(scope="module")
def folder_server(sam3_folder, tmp_path_factory):
    from sam_harness import start_server, stop_server

    server = start_server(tmp_path_factory.mktemp("hf_folder"), "--max-instances", "3",
                          "-o", f"model={sam3_folder}", "-o", "local_files_only=true",
                          "-o", "threshold=0.0", backend="hf", env={"HF_HUB_OFFLINE": "1"},
                          ready_timeout_s=300)
    yield server
    stop_server(server)


def test_hf_backend_from_a_saved_folder_builds_the_tracker_to_its_sizes(folder_server):
    """A Sam3Model folder has no tracker config: built with default sizes (hidden 256, 288 px
    features) every point or box prompt failed on this hidden-32, 224 px model."""
    info = folder_server.info()
    assert info["capabilities"] == {"text": True, "box": True, "points": True,
                                    "multimask": True}
    r = folder_server.post({"image": {"b64": png_b64(SCENE.image)}, "prompts": PROMPTS})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for prompt, res in zip(PROMPTS, results, strict=True):
        assert res["error"] is None, (prompt, res)
        assert res["instances"], prompt
        for inst in res["instances"]:
            assert masks.decode(inst["rle"]).shape == (H, W)
    for res in results[len(CONCEPT):]:  # the interactive path: one mask (multimask off)
        assert len(res["instances"]) == 1


def test_hf_identity_is_the_same_before_and_after_loading(sam3_folder):
    """/v1/info is read by a client's preflight and again later: an identity that changed on
    load ('transformers': 'not loaded' -> '5.x') changed every execute cache key between them."""
    from servers.backends.sam3_hf import Sam3HFBackend

    backend = Sam3HFBackend(model=sam3_folder, local_files_only=True, threshold=0.0)
    before = backend.info()
    backend.load()
    after = backend.info()
    assert before.identity == after.identity and before.capabilities == after.capabilities
    assert before.backend_version == after.backend_version


@pytest.mark.parametrize("mode", ["text", "text_box", "box", "box_points"])
def test_every_prompt_mode_through_the_client(folder_server, mode):
    """The client's modes against the real hf backend: preflight passes, each hypothesis gets a
    mask, and the identity (cache key) names the mode."""
    import asyncio

    from rescue.hypothesis import Prompt
    from rescue.models.sam_client import SamClient
    from rescue.sample import Sample

    sample = Sample(sample_id="s0", image=SCENE.image, query="the red shape",
                    gt=np.zeros((H, W), np.uint8), target_boxes=(tuple(BOX),))
    prompt = Prompt(text="shape", box=tuple(BOX), points=(tuple(CENTRE),), point_labels=(1,))
    client = SamClient(folder_server.url, prompt_mode=mode, retry={"attempts": 2})

    async def go():
        problems = await client.preflight()
        segs = await client.segment(sample, [prompt])
        await client.aclose()
        return problems, segs

    problems, (seg,) = asyncio.run(go())
    assert problems == [] and seg.ok, (problems, seg.error)
    assert client.identity()["prompt_mode"] == mode
