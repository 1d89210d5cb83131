"""The Qwen-VL grounding parser over a corpus of real-looking and broken outputs; the one
minimum box size; the bounded structured-output schema. Real published outputs are replayed in
test_grounding_replay.py."""

from __future__ import annotations

import inspect
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from rescue.hypothesis import Prompt
from rescue.models import classical
from rescue.models.grounding import (
    MAX_LABEL_CHARS,
    MAX_OBJECTS,
    MIN_BOX_PX,
    Frame,
    frame_for,
    grounding_schema,
    parse_grounding,
    smart_resize,
)
from rescue.models.openai_planner import GROUNDING_SCHEMA, OpenAIPlanner
from rescue.records import reason_code
from servers import prompts as server_prompts
from servers.protocol import PromptIn

CONF = Path(__file__).resolve().parents[1] / "conf"

W, H = 640, 480
REL = Frame(W, H)  # relative 0-1000


def px(box):
    """A relative-1000 box in pixels of the 640x480 test image."""
    return (box[0] * W / 1000, box[1] * H / 1000, box[2] * W / 1000, box[3] * H / 1000)


GOOD = [  # (raw output, expected box in relative coords, expected label)
    ('```json\n[\n\t{"bbox_2d": [100, 200, 300, 400], "label": "red car"}\n]\n```',
     (100, 200, 300, 400), "red car"),
    ('[{"bbox_2d": [100, 200, 300, 400], "label": "mug"}]', (100, 200, 300, 400), "mug"),
    ('{"bbox_2d": [100, 200, 300, 400], "label": "mug"}', (100, 200, 300, 400), "mug"),
    ('Sure! The object is here: {"bbox_2d": [100, 200, 300, 400], "label": "knife"}. '
     'Let me know if you need more.', (100, 200, 300, 400), "knife"),
    ('The answer is:\n```\n[{"bbox": [10, 20, 500, 600], "label": "dog"}]\n```\nDone.',
     (10, 20, 500, 600), "dog"),
    ('[{"box": [10, 20, 500, 600], "name": "the   dog"}]', (10, 20, 500, 600), "the dog"),
    ("[{'bbox_2d': [10, 20, 500, 600], 'label': 'cat',}]", (10, 20, 500, 600), "cat"),
    ('[{"bbox_2d": ["10", "20", "500", "600"], "label": "cat"}]', (10, 20, 500, 600), "cat"),
    ('[{"bbox_2d": "[10, 20, 500, 600]", "label": "cat"}]', (10, 20, 500, 600), "cat"),
    ('[{"bbox_2d": [[10, 20], [500, 600]], "label": "cat"}]', (10, 20, 500, 600), "cat"),
    ('<think>\nThe user wants [the cup].\n</think>\n[{"bbox_2d": [1, 2, 300, 400], '
     '"label": "cup"}]', (1, 2, 300, 400), "cup"),
    ('{"objects": [{"bbox_2d": [100, 200, 300, 400], "label": "mug"}]}',
     (100, 200, 300, 400), "mug"),
    ('[1, 2] is not it; here: [{"bbox_2d": [100, 200, 300, 400], "label": "mug"}]',
     (100, 200, 300, 400), "mug"),
    ('[{"bbox_2d": [300, 400, 100, 200], "label": "inverted"}]', (100, 200, 300, 400),
     "inverted"),
    ('[{"bbox_2d": [-20, -10, 1030, 1040], "label": "all"}]', (0, 0, 1000, 1000), "all"),
    # a client that strips only the backticks leaves the fence's language tag (synthetic)
    ('json\n[{"bbox_2d": [100, 200, 300, 400], "label": "mug"}]', (100, 200, 300, 400), "mug"),
]


@pytest.mark.parametrize(("raw", "rel", "label"), GOOD)
def test_good_outputs_parse(raw, rel, label):
    h = parse_grounding(3, raw, REL)
    assert h.valid, h.error
    assert h.index == 3 and h.raw == raw
    assert h.label == label
    assert h.prompt.text == label.lower()
    assert h.prompt.box == pytest.approx(px(rel), abs=0.01)


BAD = [  # (raw output, finish_reason, expected reason code)
    ("", None, "parse:empty"),
    ("   \n ", None, "parse:empty"),
    (None, None, "parse:empty"),
    ("<think>only reasoning</think>", None, "parse:empty"),
    ("I cannot find the object described in the image.", None, "parse:no_json"),
    ('[{"bbox_2d": [100, 200, 3', "length", "parse:truncated"),
    ('```json\n[{"bbox_2d": [100, 200, 300', None, "parse:truncated"),
    ('{"answer": "yes", "confidence": 0.9}', None, "parse:bad_schema"),
    ("[1, 2, 3]", None, "parse:bad_schema"),
    ("[]", None, "ground:no_object"),
    ('```json\n[]\n```', None, "ground:no_object"),
    ('{"objects": []}', None, "ground:no_object"),
    ('[{"confidence": 0.5, "label": ""}]', None, "ground:empty_object"),
    ('[{"bbox_2d": [100, 200, 300], "label": "x"}]', None, "box:malformed"),
    ('[{"bbox_2d": "somewhere", "label": "x"}]', None, "box:malformed"),
    ('[{"bbox_2d": [true, 2, 3, 4], "label": "x"}]', None, "box:malformed"),
    ('[{"bbox_2d": [NaN, 200, 300, 400], "label": "x"}]', None, "box:nonfinite"),
    ('[{"bbox_2d": [nan, 200, 300, 400], "label": "x"}]', None, "box:nonfinite"),
    ('[{"bbox_2d": [100, 200, Infinity, 400], "label": "x"}]', None, "box:nonfinite"),
    ('[{"bbox_2d": [-inf, 200, 300, 400], "label": "x"}]', None, "box:nonfinite"),
    ('[{"bbox_2d": [0, 0, 1920, 1080], "label": "x"}]', None, "box:out_of_image"),
    ('[{"bbox_2d": [1200, 1200, 1400, 1400], "label": "x"}]', None, "box:out_of_image"),
    ('[{"bbox_2d": [-200, 100, 300, 400], "label": "x"}]', None, "box:out_of_image"),
    ('[{"bbox_2d": [100, 200, 100, 400], "label": "x"}]', None, "box:degenerate"),
    ('[{"bbox_2d": [100, 200, 300, 200.5], "label": "x"}]', None, "box:degenerate"),
    ('[{"point_2d": [5000, 10]}]', None, "point:invalid"),
    ('[{"point_2d": [NaN, 10]}]', None, "point:invalid"),
    ('[{"point_2d": "center"}]', None, "point:invalid"),
]


@pytest.mark.parametrize(("raw", "finish", "code"), BAD)
def test_bad_outputs_become_invalid_with_a_stable_code(raw, finish, code):
    h = parse_grounding(7, raw, REL, finish_reason=finish)
    assert not h.valid
    assert h.index == 7 and h.prompt is None
    assert reason_code(h.error) == code, h.error
    assert h.raw == (raw or "")


@pytest.mark.parametrize(("raw", "finish"), [
    ('[]\n[{"bbox_2d": [100, 200, 3', "length"),   # an empty list, then the answer cut off
    ("[]", "length"),                                # the server stopped it, not the model
    ('{"objects": []}', "length"),
    ('```json\n[]\n```\nOr rather [{"bbox_2d": [100, 2', None),  # still open at the end
])
def test_truncation_is_checked_before_the_empty_list(raw, finish):
    """An output cut off at max_tokens is unfinished: a `[]` inside it is not the model's
    "nothing here" (ground:no_object), it is parse:truncated."""
    h = parse_grounding(0, raw, REL, finish_reason=finish)
    assert not h.valid and reason_code(h.error) == "parse:truncated", h.error


def test_a_finished_empty_list_is_still_no_object():
    for finish in (None, "stop"):
        h = parse_grounding(0, "[]", REL, finish_reason=finish)
        assert reason_code(h.error) == "ground:no_object"


def test_truncated_list_keeps_the_complete_objects():
    raw = ('[{"bbox_2d": [100, 200, 300, 400], "label": "a"}, '
           '{"bbox_2d": [500, 600, 700, 800], "label": "b"}, {"bbox_2d": [5')
    h = parse_grounding(0, raw, REL, finish_reason="length")
    assert h.valid and h.label == "a"
    assert h.meta["truncated"] is True and h.meta["finish_reason"] == "length"
    assert h.meta["n_objects"] == 2
    assert h.meta["others"] == [{"bbox_2d": [500, 600, 700, 800], "label": "b"}]


SEVERAL = ('[{"bbox_2d": [0, 0, 0, 0], "label": "broken"}, '
           '{"bbox_2d": [100, 100, 200, 200], "label": "left cup", "point_2d": [150, 150]}, '
           '{"bbox_2d": [600, 500, 800, 900], "label": "right cup"}]')


def test_several_objects_first_policy_uses_the_first_and_keeps_the_rest():
    h = parse_grounding(0, SEVERAL, REL, multi_object="first")
    assert not h.valid and reason_code(h.error) == "box:degenerate"
    assert len(h.meta["others"]) == 2


def test_several_objects_first_valid_and_union():
    h = parse_grounding(0, SEVERAL, REL, multi_object="first_valid")
    assert h.valid and h.label == "left cup"
    assert h.prompt.box == pytest.approx(px((100, 100, 200, 200)))
    assert h.prompt.points == ((96.0, 72.0),) and h.prompt.point_labels == (1,)
    u = parse_grounding(0, SEVERAL, REL, multi_object="union")
    assert u.valid and u.label == "left cup"
    assert u.prompt.box == pytest.approx(px((100, 100, 800, 900)))
    assert [o["label"] for o in u.meta["others"]] == ["broken"]


def test_points_are_mapped_and_bad_points_dropped_when_a_box_exists():
    raw = ('[{"bbox_2d": [100, 200, 300, 400], "points": [[200, 300], [9999, 1], [250, 350]], '
           '"label": "x"}]')
    h = parse_grounding(0, raw, REL)
    assert h.valid
    assert h.prompt.points == (px((200, 300, 0, 0))[:2], px((250, 350, 0, 0))[:2])
    assert "dropped_points" in h.meta["notes"]


def test_label_only_is_a_text_prompt_and_point_only_a_point_prompt():
    h = parse_grounding(0, '[{"label": "the bread knife"}]', REL)
    assert h.valid and h.prompt.text == "the bread knife" and h.prompt.box is None
    p = parse_grounding(0, '{"point_2d": [500, 500]}', REL)
    assert p.valid and p.prompt.points == ((320.0, 240.0),) and p.prompt.text is None


def test_absolute_coordinates_map_through_the_models_frame():
    # Qwen2.5-VL saw the image resized by smart_resize; its pixels map back to the original
    frame = frame_for(W, H, "absolute", {"kind": "smart_resize", "factor": 28,
                                         "min_pixels": 3136, "max_pixels": 12845056})
    mh, mw = smart_resize(H, W)
    assert (frame.model_width, frame.model_height) == (mw, mh) == (644, 476)
    raw = f'[{{"bbox_2d": [0, 0, {mw}, {mh / 2}], "label": "top half"}}]'
    h = parse_grounding(0, raw, frame)
    assert h.prompt.box == pytest.approx((0, 0, W, H / 2))
    # the same numbers read as relative 0-1000 would be another box entirely
    assert parse_grounding(0, raw, REL).prompt.box != h.prompt.box
    # relative coordinates beyond 1000 under an absolute frame are fine, and vice versa
    big = '[{"bbox_2d": [10, 10, 640, 470], "label": "x"}]'
    assert parse_grounding(0, big, frame_for(W, H, "absolute")).valid
    assert parse_grounding(0, '[{"bbox_2d": [10, 10, 1900, 900]}]',
                           frame_for(W, H, "absolute")).error.startswith("box:out_of_image")


def test_absolute_without_resize_uses_the_sent_size():
    frame = frame_for(W, H, "absolute", None, sent_size=(320, 240))
    h = parse_grounding(0, '[{"bbox_2d": [0, 0, 160, 120]}]', frame)
    assert h.prompt.box == pytest.approx((0, 0, 320, 240))


def _smart_resize_brute(h, w, factor, min_pixels, max_pixels):
    """Among multiples of `factor` near the aspect ratio, the size the rule asks for."""
    hb = max(factor, round(h / factor) * factor)
    wb = max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        return max(factor, int(h / beta // factor) * factor), max(factor,
                                                                  int(w / beta // factor) * factor)
    if hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        return math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def test_smart_resize_matches_the_rule_and_its_bounds():
    rng = random.Random(0)
    for _ in range(300):
        h, w = rng.randint(20, 5000), rng.randint(20, 5000)
        if max(h, w) / min(h, w) > 150:
            continue
        got = smart_resize(h, w, 28, 56 * 56, 1280 * 28 * 28)
        assert got == _smart_resize_brute(h, w, 28, 56 * 56, 1280 * 28 * 28)
        assert got[0] % 28 == 0 and got[1] % 28 == 0
        assert got[0] * got[1] <= 1280 * 28 * 28


def test_parser_never_raises_on_garbage():
    rng = random.Random(1)
    good = json.dumps([{"bbox_2d": [100, 200, 300, 400], "point_2d": [200, 300],
                        "label": "cup"}])
    alphabet = '[]{}",:0123456789.-eE abcNaInfty\n`'
    for i in range(400):
        if i % 2:
            s = list(good)
            for _ in range(rng.randint(1, 6)):
                s[rng.randrange(len(s))] = rng.choice(alphabet)
            raw = "".join(s)[: rng.randint(0, len(good))]
        else:
            raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        h = parse_grounding(i, raw, REL)
        assert h.index == i
        assert h.valid or reason_code(h.error).split(":")[0] in {"parse", "ground", "box",
                                                                 "point"}
        if h.valid and h.prompt.box is not None:
            x1, y1, x2, y2 = h.prompt.box
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H


def test_bad_policy_or_coords_is_a_config_error():
    with pytest.raises(ValueError, match="multi_object"):
        parse_grounding(0, "[]", REL, multi_object="largest")
    with pytest.raises(ValueError, match="coords"):
        Frame(W, H, coords="normalized")
    with pytest.raises(ValueError, match=r"resize\.kind"):
        frame_for(W, H, "absolute", {"kind": "bilinear"})


# --- one minimum box size -------------------------------------------------------------------


def test_one_minimum_box_size_for_the_planner_and_every_executor():
    """The planner's parser, the classical executor and the SAM server (every backend behind it)
    read one constant, so a box the planner accepts is never refused downstream, and back."""
    assert parse_grounding.__kwdefaults__["min_box_px"] == MIN_BOX_PX
    default = inspect.signature(OpenAIPlanner).parameters["min_box_px"].default
    assert default == MIN_BOX_PX
    assert OpenAIPlanner("m", "http://x/v1", {"user": "{query}"}).min_box_px == MIN_BOX_PX
    assert classical.MIN_BOX_PX is MIN_BOX_PX
    assert server_prompts.MIN_SIDE_PX is MIN_BOX_PX
    for path in sorted((CONF / "planner").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert cfg.get("min_box_px", MIN_BOX_PX) == MIN_BOX_PX, path.name


@pytest.mark.parametrize(("side", "ok"), [(MIN_BOX_PX, True), (MIN_BOX_PX * 0.9, False),
                                          (MIN_BOX_PX * 1.5, True)])
def test_planner_executor_and_server_agree_on_a_thin_box(side, ok):
    w, h = 1000, 800  # 1 relative unit = 1 px across
    frame = Frame(w, h)
    x1, y1 = 400.0, 400.0 * 1000 / h
    raw = json.dumps([{"bbox_2d": [x1, y1, x1 + side, y1 + 100], "label": "pole"}])
    planned = parse_grounding(0, raw, frame)
    assert planned.valid is ok, planned.error
    box = (400.0, 400.0, 400.0 + side, 500.0)
    image = np.full((h, w, 3), 127, np.uint8)
    seg = classical.grabcut_segment(image, Prompt(box=box))
    assert ("box:degenerate" not in (seg.error or "")) is ok, seg.error
    try:
        server_prompts.validate_prompt(PromptIn(box=list(box)), w, h, 0.05, 64)
        served = True
    except server_prompts.PromptInvalid:
        served = False
    assert served is ok


# --- the structured-output schema -----------------------------------------------------------


def _coord(schema, key):
    return schema["items"]["properties"][key]["items"]


def test_relative_schema_bounds_coordinates_items_and_labels():
    s = grounding_schema("relative_1000")
    for key in ("bbox_2d", "point_2d"):
        assert _coord(s, key) == {"type": "integer", "minimum": 0, "maximum": 1000}
    assert s["minItems"] == 1 and s["maxItems"] == MAX_OBJECTS
    assert s["items"]["properties"]["label"]["maxLength"] == MAX_LABEL_CHARS
    assert s["items"]["additionalProperties"] is False
    assert set(s["items"]["required"]) == {"label", "bbox_2d"}
    assert s == GROUNDING_SCHEMA


def test_absolute_schema_is_integer_and_non_negative_but_not_bounded_above():
    s = grounding_schema("absolute")
    for key in ("bbox_2d", "point_2d"):
        assert _coord(s, key) == {"type": "integer", "minimum": 0}
    with pytest.raises(ValueError, match="coords"):
        grounding_schema("normalized")


@pytest.mark.parametrize("coords", ["relative_1000", "absolute"])
def test_the_planner_sends_and_keys_on_the_schema_of_its_coords(coords):
    planner = OpenAIPlanner("m", "http://x/v1", {"user": "{query}"}, coords=coords,
                            structured_output=True)
    sent = planner.payload([], 0, 2)["response_format"]["json_schema"]["schema"]
    assert sent == grounding_schema(coords) == planner.identity()["structured_output"]


def test_the_schema_refuses_what_a_model_ran_wild_with():
    jsonschema = pytest.importorskip("jsonschema")
    s = grounding_schema("relative_1000")
    ok = [{"label": "cup", "bbox_2d": [1, 2, 300, 400], "point_2d": [150, 200]}]
    jsonschema.validate(ok, s)
    bad = [
        [{"label": "cup", "bbox_2d": [-900000, 6, 7, -80]}],           # seen on a real vLLM
        [{"label": "cup", "bbox_2d": [1, 2, 300, 1001]}],
        [{"label": "cup", "bbox_2d": [1.5, 2, 300, 400]}],
        [{"label": "cup", "bbox_2d": [1, 2, 300, 400], "confidence": 0.9}],
        [{"label": "x" * (MAX_LABEL_CHARS + 1), "bbox_2d": [1, 2, 300, 400]}],
        ok * (MAX_OBJECTS + 1),
        [],
    ]
    for value in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, s)
    jsonschema.validate([{"label": "cup", "bbox_2d": [0, 0, 4032, 3024]}],
                        grounding_schema("absolute"))


def test_the_whitespace_flag_is_documented_where_structured_output_is_configured():
    """The schema cannot bound whitespace between tokens; the server flag does."""
    text = (CONF / "planner" / "qwen3vl_8b_instruct.yaml").read_text()
    assert "disable_any_whitespace" in text and "--structured-outputs-config" in text


def test_a_canonical_prompt_is_its_own_canonical_form_and_a_replaced_one_is_not():
    import dataclasses

    raw = Prompt(text="  A  Red\tCar ", box=(1.234, 2.0051, 3.5, 4.25),
                 points=((1.111, 2.005),), point_labels=(1,))
    c = raw.canonical()
    same = Prompt(text="a red car", box=(1.23, 2.01, 3.5, 4.25), points=((1.11, 2.0),),
                  point_labels=(1,))
    assert c == same and hash(c) == hash(same)  # the mark is not part of a prompt's identity
    assert c.canonical() is c and Prompt.from_json(c.to_json()).canonical() == c
    assert raw.canonical() is c  # computed once per prompt
    moved = dataclasses.replace(c, box=(9.876, 0, 1, 1))  # no longer canonical: rounded anew
    assert moved.canonical() is not moved and moved.canonical().box == (9.88, 0.0, 1.0, 1.0)
