"""The planner reads its answer wherever the server put it (issue 8): in `content`, in vLLM's
`reasoning` / `reasoning_content` when a reasoning parser ran, or after `</think>` in `content`
when none ran; a thinking planner's answer exists only once its reasoning closed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as NS

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from rescue.models.grounding import frame_for
from rescue.models.openai_planner import OpenAIPlanner

ANSWER = '[{"label": "cup", "bbox_2d": [100, 200, 500, 600], "point_2d": [300, 400]}]'
DRAFT = 'The cup is maybe at [{"label": "cup", "bbox_2d": [0, 0, 900, 900]}] hmm, or'
FRAME = frame_for(1000, 1000)


def _planner(**kw):
    return OpenAIPlanner("m", "http://127.0.0.1:9/v1", "find {query}", **kw)


def _choice(content, *, reasoning=None, reasoning_content=None, finish="stop", typed=True):
    """A choice as the openai client parses vLLM's reply; `typed=False` leaves vLLM's extra
    message fields in `model_extra`, as openai does for fields its types lack."""
    extra = {k: v for k, v in (("reasoning", reasoning),
                               ("reasoning_content", reasoning_content)) if v is not None}
    msg = NS(content=content, **extra, model_extra={}) if typed else NS(content=content,
                                                                        model_extra=extra)
    return NS(message=msg, finish_reason=finish, index=0)


@pytest.mark.parametrize("typed", [True, False])
@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_answer_behind_a_reasoning_parser_is_read_from_content(field, typed):
    choice = _choice(ANSWER, **{field: "Let me look. " + DRAFT}, typed=typed)
    h = _planner(thinking=True).read(0, choice, FRAME)
    assert h.valid and h.prompt.box == (100.0, 200.0, 500.0, 600.0)
    assert h.meta["reasoning_placement"] == field and "Let me look" in h.meta["reasoning"]


def test_a_parser_that_took_a_non_thinking_answer_into_reasoning_is_still_read():
    """deepseek_r1's parser puts an output with no `</think>` entirely in `reasoning`: before
    the fix every such answer was `parse:empty`."""
    h = _planner().read(0, _choice(None, reasoning=ANSWER), FRAME)
    assert h.valid and h.prompt.box == (100.0, 200.0, 500.0, 600.0)
    assert h.meta["answer_from"] == "reasoning"


def test_think_tags_in_content_without_a_parser():
    h = _planner(thinking=True).read(0, _choice(DRAFT + "</think>\n\n" + ANSWER), FRAME)
    assert h.valid and h.prompt.box == (100.0, 200.0, 500.0, 600.0)
    assert h.meta["reasoning_placement"] == "think_tag"


@pytest.mark.parametrize("choice", [
    _choice(DRAFT, finish="length"),                    # template opened <think>, no parser
    _choice(None, reasoning=DRAFT, finish="length"),    # parser: all of it reasoning
    _choice("<think>" + DRAFT, finish="length"),        # tag echoed, never closed
    _choice(DRAFT, finish="stop"),                      # stopped without closing </think>
])
def test_a_thinking_planners_unfinished_reasoning_is_truncated_not_a_box(choice):
    h = _planner(thinking=True).read(0, choice, FRAME)
    assert not h.valid and h.error.startswith("parse:truncated")
    assert h.meta["finish_reason"] == choice.finish_reason


def test_an_instruct_planner_reads_plain_content_as_before():
    h = _planner().read(3, _choice(ANSWER), FRAME)
    assert h.valid and h.index == 3 and h.meta["reasoning_placement"] == "none"
    assert "reasoning" not in h.meta


def test_thinking_is_part_of_the_identity_only_when_on():
    assert "thinking" not in _planner().identity()  # existing caches keep their keys
    assert _planner(thinking=True).identity()["thinking"] is True


def test_thinking_planner_config_follows_the_model_card():
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=http_synthetic",
                                                       "planner=qwen3vl_8b_thinking"])
    p = instantiate(cfg.planner)
    assert p.thinking and p.model == "Qwen3-VL-8B-Thinking"
    assert (p.sampling.temperature, p.sampling.top_p, p.sampling.presence_penalty,
            p.sampling.max_tokens) == (1.0, 0.95, 0.0, 40960)
    assert "{query}" in p.template.user
