"""Real, published Qwen3-VL / Qwen2.5-VL grounding outputs replayed through `parse_grounding`.

Each case in fixtures/qwen3vl_replay/outputs.json is a model answer copied verbatim from Qwen's
own cookbooks (QwenLM/Qwen3-VL, QwenLM/Qwen2.5-VL) or a GitHub issue, with its source, the
prompt that produced it and the size of the image it was asked about. Together they cover what
real outputs do: fenced lists with extra keys and no `label`, a stray `{` that breaks the JSON,
a tab-indented 27-object list, trailing commas (Qwen2.5-VL, absolute pixels of its resized
input), a `point_2d` answer, a bare object inside prose, and an answer cut off at max_tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rescue.models.grounding import frame_for, grounding_schema, parse_grounding
from rescue.records import reason_code

CASES = json.loads((Path(__file__).parent / "fixtures" / "qwen3vl_replay" / "outputs.json")
                   .read_text(encoding="utf-8"))["cases"]
BY_ID = {c["id"]: c for c in CASES}
PX = 0.01  # Prompt.canonical() keeps two decimals of a pixel


def _frame(case):
    f = case["frame"]
    return frame_for(f["width"], f["height"], f["coords"], f.get("resize"))


def _rel_to_px(case, xs):
    w, h = case["frame"]["width"], case["frame"]["height"]
    return [v / 1000 * (w if i % 2 == 0 else h) for i, v in enumerate(xs)]


def test_every_case_names_its_source_and_is_real_text():
    assert len(CASES) >= 7
    for c in CASES:
        src = c["source"]
        assert src.get("issue", "").startswith("https://github.com/") or (
            src["repo"].startswith("QwenLM/") and src["path"].endswith(".ipynb")), c["id"]
        assert c["raw"] and c["model"] and c["prompt"], c["id"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_real_output_parses_as_expected(case):
    frame = _frame(case)
    h = parse_grounding(0, case["raw"], frame, finish_reason=case.get("finish_reason"))
    want = case["expect"]
    assert h.raw == case["raw"]
    if "code" in want:
        assert not h.valid and reason_code(h.error) == want["code"], h.error
        return
    assert h.valid, h.error
    assert h.meta["n_objects"] == want["n_objects"]
    assert h.label == want["label"]
    if "first_rel" in want:
        assert h.prompt.box == pytest.approx(_rel_to_px(case, want["first_rel"]), abs=PX)
    if "first_point_rel" in want:
        assert h.prompt.points == (pytest.approx(tuple(_rel_to_px(case, want["first_point_rel"]))),)
        assert h.prompt.box is None
    if "first_abs" in want:
        mw, mh = want["model_size"]
        assert (frame.model_width, frame.model_height) == (mw, mh)  # the notebook's 868 x 1400
        w, h_ = case["frame"]["width"], case["frame"]["height"]
        x1, y1, x2, y2 = want["first_abs"]
        assert h.prompt.box == pytest.approx((x1 * w / mw, y1 * h_ / mh, x2 * w / mw,
                                              y2 * h_ / mh), abs=PX)


def test_the_stray_brace_costs_no_object():
    """QwenLM/Qwen3-VL omni_recognition: `{\\n\\t{"bbox_2d": ...` is not JSON; every one of the
    nine characters is still recovered, in order, and none is dropped as `others` overflow."""
    case = BY_ID["qwen3vl_omni_recognition_anime_stray_brace"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(case["raw"].removeprefix("```json\n").removesuffix("\n```"))
    h = parse_grounding(0, case["raw"], _frame(case), multi_object="union")
    assert h.valid and h.meta["n_objects"] == 9
    assert h.prompt.box == pytest.approx(_rel_to_px(case, [0, 0, 999, 999]), abs=PX)


def test_a_real_list_cut_at_max_tokens_keeps_its_complete_objects():
    """The 27-object dining-table answer as a server would return it at a smaller max_tokens:
    cut inside object 13, finish_reason=length."""
    case = BY_ID["qwen3vl_2d_grounding_dining_table"]
    raw = case["raw"]
    cut = raw.index('"bbox_2d": [162, 0, 303') + len('"bbox_2d": [162, 0, 3')
    h = parse_grounding(0, raw[:cut], _frame(case), finish_reason="length")
    assert h.valid and h.label == "plate/dish"
    assert h.meta["truncated"] is True and h.meta["n_objects"] == 12


def test_the_bounded_schema_admits_the_real_list_shaped_as_the_prompt_asks():
    """The 27 objects (label + integer bbox_2d in 0-1000) are a legal answer under the
    structured-output schema: its item cap and bounds do not cut off real outputs."""
    jsonschema = pytest.importorskip("jsonschema")
    case = BY_ID["qwen3vl_2d_grounding_dining_table"]
    objects = json.loads(case["raw"].removeprefix("```json\n").removesuffix("\n```"))
    assert len(objects) == 27
    jsonschema.validate(objects, grounding_schema("relative_1000"))
