"""The SAM server with the classical backend, as a real process over HTTP: masks, RLE, the
image LRU (one encode per image), the sha256 re-use path."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from sam_harness import png_b64
from sam_scenes import iou, make_scene, padded_box

from rescue import masks
from rescue.hypothesis import Prompt
from rescue.models.classical import grabcut_segment
from rescue.sample import image_digest

BOX_IOU = 0.90
"""Box prompts on flat shapes: GrabCut should be exact up to about one pixel of boundary. The
smallest shape is about 60x80 px (area >= ~2400 px, perimeter <= ~250 px), so a one-pixel
boundary error costs at most ~0.1 IoU; measured 1.0 on all 36 shapes of scenes 0-11."""

POINT_IOU = 0.75
"""A single point has no extent: the classical backend grows a box of 0.15 x the long image
side around it, which can cut the far end of a large shape (measured 1.0 on scenes 0-11 with
the current GrabCut; 0.855 with an earlier version): the margin is for that box."""


def _mask(result: dict) -> np.ndarray:
    assert result["error"] is None, result
    assert result["instances"], result
    return masks.decode(result["instances"][0]["rle"])


def test_health_and_info(classical_server) -> None:
    h = classical_server.health()
    assert h.status_code == 200
    assert h.json() == {"status": "ok", "backend": "classical", "ready": True, "error": None}
    info = classical_server.info()
    assert info["backend"] == "classical" and info["model"] == "grabcut"
    assert info["protocol"] == 1
    assert info["capabilities"]["box"] and not info["capabilities"]["text"]
    assert info["image_cache_size"] == 4
    assert info["identity"]["backend"] == "classical"
    assert {"encodes", "cache_hits", "requests", "peak_rss_mb"} <= set(info["stats"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_and_point_masks_match_truth(classical_server, seed: int) -> None:
    scene = make_scene(seed)
    h, w = scene.image.shape[:2]
    prompts = []
    for s in scene.shapes:
        prompts.append({"box": padded_box(s.box, 0.1, w, h)})
        prompts.append({"points": [list(s.centre)], "point_labels": [1]})
    r = classical_server.post({"image": {"b64": png_b64(scene.image)}, "prompts": prompts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (w, h)
    assert len(body["results"]) == len(prompts)
    for i, s in enumerate(scene.shapes):
        box_iou = iou(_mask(body["results"][2 * i]), s.mask)
        point_iou = iou(_mask(body["results"][2 * i + 1]), s.mask)
        assert box_iou >= BOX_IOU, (s.name, box_iou)
        assert point_iou >= POINT_IOU, (s.name, point_iou)


def test_rle_round_trip_and_boxes(classical_server) -> None:
    scene = make_scene(3)
    h, w = scene.image.shape[:2]
    prompts = [{"box": padded_box(s.box, 0.1, w, h)} for s in scene.shapes]
    body = classical_server.post({"image": {"b64": png_b64(scene.image)},
                                  "prompts": prompts}).json()
    for res in body["results"]:
        inst = res["instances"][0]
        assert inst["rle"]["size"] == [h, w]
        m = masks.decode(inst["rle"])
        assert m.shape == (h, w) and m.dtype == bool and m.any()
        assert masks.encode(m) == inst["rle"]  # decode -> encode is the identity
        assert tuple(inst["box"]) == masks.bbox(m)
        assert 0.0 <= inst["score"] <= 1.0


def test_one_encode_per_image_across_prompts_and_requests(server_factory) -> None:
    server = server_factory("--image-cache-size", "4")
    scene = make_scene(4)
    h, w = scene.image.shape[:2]
    boxes = [padded_box(s.box, f, w, h) for s in scene.shapes for f in (0.05, 0.1, 0.2)]
    prompts = [{"box": b} for b in boxes] * 4  # 36 prompts
    b64 = png_b64(scene.image)
    assert server.info()["stats"]["encodes"] == 0

    first = server.post({"image": {"b64": b64}, "prompts": prompts}).json()
    assert first["image_cached"] is False
    assert server.info()["stats"]["encodes"] == 1

    # the same image again, by bytes and by digest, in several requests: no new encode
    again = server.post({"image": {"b64": b64}, "prompts": prompts[:5]}).json()
    by_sha = server.post({"image": {"sha256": first["image_sha256"]},
                          "prompts": prompts[:7]}).json()
    assert again["image_cached"] and by_sha["image_cached"]
    stats = server.info()["stats"]
    assert stats["encodes"] == 1
    assert stats["cache_hits"] == 2
    assert stats["prompts"] == 36 + 5 + 7

    # identical prompts give identical masks whichever path the image came by
    assert by_sha["results"][:7] == first["results"][:7]

    other = make_scene(5)
    server.post({"image": {"b64": png_b64(other.image)}, "prompts": [{"box": [1, 1, 60, 60]}]})
    assert server.info()["stats"]["encodes"] == 2


def test_digest_is_the_samples_pixel_digest(classical_server) -> None:
    scene = make_scene(6)
    body = classical_server.post({"image": {"b64": png_b64(scene.image)},
                                  "prompts": [{"box": [10, 10, 100, 100]}]}).json()
    assert body["image_sha256"] == image_digest(scene.image)


def test_unknown_digest_is_404_image_not_found(classical_server) -> None:
    sha = "ab" * 32
    r = classical_server.post({"image": {"sha256": sha}, "prompts": [{"box": [1, 1, 9, 9]}]})
    assert r.status_code == 404
    assert r.json()["detail"]["code"] == "image_not_found"
    assert r.json()["detail"]["sha256"] == sha


def test_evicted_image_is_404_then_resend_works(server_factory) -> None:
    server = server_factory("--image-cache-size", "1")
    a, b = make_scene(7).image, make_scene(8).image
    prompt = [{"box": [5, 5, 120, 100]}]
    sha_a = server.post({"image": {"b64": png_b64(a)}, "prompts": prompt}).json()["image_sha256"]
    server.post({"image": {"b64": png_b64(b)}, "prompts": prompt})  # evicts a
    r = server.post({"image": {"sha256": sha_a}, "prompts": prompt})
    assert r.status_code == 404 and r.json()["detail"]["code"] == "image_not_found"
    r = server.post({"image": {"b64": png_b64(a)}, "prompts": prompt})
    assert r.status_code == 200 and r.json()["image_sha256"] == sha_a
    assert server.info()["stats"]["encodes"] == 3


def test_text_only_prompt_is_a_per_prompt_error(classical_server) -> None:
    scene = make_scene(9)
    body = classical_server.post({"image": {"b64": png_b64(scene.image)}, "prompts": [
        {"text": "the red shape"}, {"box": padded_box(scene.shapes[0].box, 0.1, 320, 240)}]}
    ).json()
    assert body["results"][0]["instances"] == []
    assert "prompt:text_only" in body["results"][0]["error"]
    assert body["results"][1]["error"] is None and body["results"][1]["instances"]


def test_non_strict_turns_invalid_prompts_into_per_prompt_errors(classical_server) -> None:
    scene = make_scene(10)
    good = {"box": padded_box(scene.shapes[1].box, 0.1, 320, 240)}
    r = classical_server.post({"image": {"b64": png_b64(scene.image)}, "strict": False,
                               "prompts": [{"box": [5000, 5, 6000, 50]}, good,
                                           {"points": [[3, 4]], "point_labels": []}]})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert res[0]["instances"] == [] and "outside" in res[0]["error"]
    assert res[1]["error"] is None and iou(_mask(res[1]), scene.shapes[1].mask) >= BOX_IOU
    assert "point_labels" in res[2]["error"]


def test_box_slightly_outside_is_clipped(classical_server) -> None:
    scene = make_scene(11)
    s = scene.shapes[0]
    _, _, x2, y2 = padded_box(s.box, 0.1, 320, 240)
    box = [-6.0, -2.0, x2, y2]  # outside by less than the 5 % tolerance (16 x 12 px)
    r = classical_server.post({"image": {"b64": png_b64(scene.image)}, "prompts": [{"box": box}]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["error"] is None
    assert iou(_mask(r.json()["results"][0]), s.mask) >= BOX_IOU


def test_jpeg_and_grayscale_images_are_accepted(classical_server) -> None:
    scene = make_scene(12)
    buf = io.BytesIO()
    Image.fromarray(scene.image).save(buf, format="JPEG", quality=95)
    box = padded_box(scene.shapes[0].box, 0.1, 320, 240)
    r = classical_server.post({"image": {"b64": base64.b64encode(buf.getvalue()).decode()},
                               "prompts": [{"box": box}]})
    assert r.status_code == 200
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert r.json()["image_sha256"] == image_digest(decoded)
    # the server segments the decoded JPEG pixels, exactly as GrabCut does here
    local = grabcut_segment(decoded, Prompt(box=tuple(box)))
    assert r.json()["results"][0]["instances"][0]["rle"] == local.rle

    gray = io.BytesIO()
    Image.fromarray(scene.image).convert("L").save(gray, format="PNG")
    r = classical_server.post({"image": {"b64": base64.b64encode(gray.getvalue()).decode()},
                               "prompts": [{"box": [10, 10, 200, 200]}]})
    assert r.status_code == 200 and r.json()["width"] == 320


def test_openapi_documents_the_protocol(classical_server) -> None:
    spec = httpx.get(classical_server.url + "/openapi.json", timeout=10).json()
    assert "/v1/segment" in spec["paths"] and "/v1/info" in spec["paths"]
    schemas = spec["components"]["schemas"]
    assert {"SegmentRequest", "SegmentResponse", "PromptIn", "ErrorResponse"} <= set(schemas)
    assert [alt["required"] for alt in schemas["ImageRef"]["oneOf"]] == [["b64"], ["sha256"]]
    assert set(spec["paths"]["/v1/segment"]["post"]["responses"]) >= {"200", "401", "404", "413",
                                                                       "422", "503"}


def test_nothing_found_in_a_downscaled_crop_is_no_instances_not_an_error(classical_server) -> None:
    # a flat 800x800 image: the 800 px crop is downscaled to 512 and GrabCut keeps nothing;
    # the server used to answer error "execute:grabcut_failed ValueError: could not broadcast"
    flat = np.full((800, 800, 3), 128, np.uint8)
    r = classical_server.post({"image": {"b64": png_b64(flat)},
                               "prompts": [{"box": [200, 200, 600, 600]}]})
    assert r.status_code == 200, r.text
    assert r.json()["results"] == [{"instances": [], "error": None}]
