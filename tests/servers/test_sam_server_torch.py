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


# --- an image's prompts batched: the same answers as one prompt at a time -------------------


def _mixed_prompts():
    from rescue.hypothesis import Prompt

    (b0, b1, b2), (c0, c1, c2) = ([tuple(float(v) for v in getattr(s, k)) for s in SCENE.shapes]
                                  for k in ("box", "centre"))
    one = {"point_labels": (1,)}
    return [Prompt(text="red rectangle"), Prompt(text="shape", box=b0), Prompt(box=b0),
            Prompt(box=b1, points=(c1,), **one), Prompt(points=(c0,), **one),
            Prompt(text="red rectangle"), Prompt(box=b0),  # duplicates in the same batch
            Prompt(text="blue ellipse"), Prompt(text="thing", box=b2),
            Prompt(points=(c2,), **one), Prompt(box=b2),
            Prompt(points=(c1, c2), point_labels=(1, 0)),
            Prompt(text="not read", points=(c0,), **one)]  # points: the interactive path


def _near_threshold(backend, out, tracker: bool):
    """(prompts, H, W): pixels where some mask of that pass, upsampled as the backend does it,
    lies within 1e-4 of the threshold, relative to the pass's largest distance from it (random
    weights give logits of ~1e-4, so an absolute 1e-4 would cover the whole image)."""
    import torch

    if tracker:  # logits (1, prompts, masks, h, w), upsampled by the tracker's processor
        up = backend._tracker_processor.post_process_masks(out.pred_masks, [[H, W]],
                                                           binarize=False)[0]
    else:  # probabilities (prompts, queries, h, w) upsampled, threshold 0.5
        up = torch.nn.functional.interpolate(out.pred_masks.float().sigmoid(), size=(H, W),
                                             mode="bilinear", align_corners=False) - 0.5
    return (up.abs() <= 1e-4 * up.abs().max()).any(dim=1).numpy()


def test_batched_prompts_give_the_answers_of_one_prompt_at_a_time(sam3_folder):
    """Text, text + box, box, box + points, points (one and two), duplicates: one image's 13
    prompts in 6 forward passes (one per batch key) against 13 passes one by one. Results in
    the prompts' order; same instances and scores; masks the same pixel for pixel except where
    a logit lies within float noise of the threshold (counted; none on this scene). A single
    click's kept mask is the best of the three the processor upsamples."""
    import torch

    from servers.backends.base import SegmentOptions
    from servers.backends.batching import chunks
    from servers.backends.sam3_hf import Sam3HFBackend

    backend = Sam3HFBackend(model=sam3_folder, local_files_only=True, threshold=0.0)
    backend.load()
    state = backend.encode(SCENE.image)
    prompts, options = _mixed_prompts(), SegmentOptions(max_instances=3)
    passes: list = []
    for model in (backend._model, backend._tracker):
        model.register_forward_hook(lambda m, args, out: passes.append((m, out)))

    backend.max_batch = 1
    alone = [backend.segment(state, [p], options)[0] for p in prompts]
    alone_passes = list(passes)
    passes.clear()
    backend.max_batch = 16
    batched = backend.segment(state, prompts, options)
    groups = chunks(prompts, lambda p: backend.batch_key(p, options), 16)
    assert len(alone_passes) == len(prompts) and len(passes) == len(groups) == 6

    flips = 0
    for idx, (model, out) in zip(groups, passes, strict=True):
        tracker = model is backend._tracker
        raw = out.pred_masks[0] if tracker else out.pred_masks
        for row, i in enumerate(idx):
            one = alone_passes[i][1]
            one_raw = one.pred_masks[0, 0] if tracker else one.pred_masks[0]
            # the raw logits of a prompt in a batch and alone: float noise only
            assert torch.allclose(raw[row], one_raw, rtol=0, atol=1e-5 * one_raw.abs().max())
            near = _near_threshold(backend, one, tracker)[0]
            if tracker and one.pred_masks.shape[2] > 1:  # one click: 3 masks, the best kept
                every = backend._tracker_processor.post_process_masks(one.pred_masks, [[H, W]])
                best = int(one.iou_scores[0, 0].argmax())
                assert alone[i].instances[0].rle == masks.encode(every[0][0, best].numpy())
            assert near.mean() < 0.01  # the exemption is a thin band, not the image
            a, b = alone[i], batched[i]
            assert a.error is None and b.error is None, (prompts[i], a.error, b.error)
            assert len(a.instances) == len(b.instances) >= 1, prompts[i]
            np.testing.assert_allclose([x.score for x in b.instances],
                                       [x.score for x in a.instances], rtol=0, atol=1e-5)
            for x, y in zip(a.instances, b.instances, strict=True):
                differ = masks.decode(x.rle) != masks.decode(y.rle)
                assert not (differ & ~near).any(), prompts[i]
                flips += int(differ.sum())
    assert flips == 0  # on this scene and seed: every mask the same pixel for pixel
    # duplicates answer alike; prompts keep their order
    assert batched[0] == batched[5] and batched[2] == batched[6]
    assert [len(r.instances) for r in batched] == [len(r.instances) for r in alone]


def test_a_failing_batch_falls_back_to_one_prompt_at_a_time(sam3_folder, monkeypatch):
    """A batched call that raises runs its prompts alone: a prompt that fails alone fails only
    itself, its batch mates are answered."""
    from rescue.hypothesis import Prompt
    from servers.backends.base import SegmentOptions
    from servers.backends.sam3_hf import Sam3HFBackend

    backend = Sam3HFBackend(model=sam3_folder, local_files_only=True, threshold=0.0)
    backend.load()
    state = backend.encode(SCENE.image)
    prompts = [Prompt(text="red rectangle"), Prompt(text="poison"), Prompt(text="shape")]
    concept = backend._concept

    def fragile(st, group, options):
        if any(p.text == "poison" for p in group):
            raise ValueError("bad prompt")
        return concept(st, group, options)

    monkeypatch.setattr(backend, "_concept", fragile)
    out = backend.segment(state, prompts, SegmentOptions(max_instances=2))
    assert out[1].instances == [] and "ValueError: bad prompt" in out[1].error
    assert out[0].error is None and out[2].error is None and out[0].instances and out[2].instances

    def oom(st, group, options):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(backend, "_concept", oom)  # out of memory is the request's failure
    with pytest.raises(RuntimeError, match="out of memory"):
        backend.segment(state, prompts, SegmentOptions())
