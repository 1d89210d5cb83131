"""Raw model text is stored up to a cap, with its length (issue 14): a 10 MB answer made a
43 MB plan segment. Parsing and scoring still read the whole reply."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

from rescue.models import answers
from rescue.models.grounding import frame_for
from rescue.models.openai_planner import OpenAIPlanner
from rescue.models.openai_verifier import OpenAIVerifier

CAP = answers.RAW_CAP
ANSWER = '[{"label": "cup", "bbox_2d": [100, 200, 500, 600]}]'
FRAME = frame_for(1000, 1000)
BIG = 1_000_000


def _choice(content, reasoning=None, finish="stop"):
    msg = NS(content=content, reasoning=reasoning, model_extra={})
    return NS(message=msg, finish_reason=finish, index=0, logprobs=None)


def _planner(**kw):
    return OpenAIPlanner("m", "http://127.0.0.1:9/v1", "find {query}", **kw)


def _verifier():
    return OpenAIVerifier("m", "http://127.0.0.1:9/v1", "Q: {query}", logprobs=False)


def test_capped_keeps_head_and_tail_and_names_the_cut():
    text = "h" * 30_000 + "TAIL"
    out = answers.capped(text)
    assert out.startswith("h" * 1000) and out.endswith("TAIL")
    assert f"[... {len(text) - CAP} characters cut ...]" in out
    assert len(out) < CAP + 64
    assert answers.capped("short") == "short"


def test_a_huge_planner_answer_is_parsed_whole_and_stored_capped():
    text = ANSWER + " " + "z" * BIG
    h = _planner().read(0, _choice(text), FRAME)
    assert h.valid and h.prompt.box == (100.0, 200.0, 500.0, 600.0)
    assert h.meta["raw_chars"] == len(text)
    assert h.raw.startswith(ANSWER) and len(h.raw) < CAP + 64
    assert len(json.dumps(h.to_json())) < 2 * CAP


def test_a_huge_planner_reasoning_is_stored_capped():
    reasoning = "hmm " * (BIG // 4)
    h = _planner(thinking=True).read(0, _choice(ANSWER, reasoning=reasoning), FRAME)
    assert h.valid
    assert h.meta["reasoning_chars"] == len(reasoning.strip())
    assert len(h.meta["reasoning"]) < CAP + 64
    assert "raw_chars" not in h.meta and h.raw == ANSWER


def test_a_truncated_planner_reply_is_capped_too():
    text = "<think>" + "w" * BIG
    h = _planner(thinking=True).read(0, _choice(text, finish="length"), FRAME)
    assert h.error.startswith("parse:truncated")
    assert len(json.dumps(h.to_json())) < 3 * CAP


def test_a_small_planner_reply_is_stored_as_it_was():
    h = _planner().read(0, _choice(ANSWER), FRAME)
    assert h.raw == ANSWER and not {"raw_chars", "reasoning_chars"} & set(h.meta)


def test_a_huge_verifier_reasoning_is_scored_and_stored_capped():
    reasoning = "let me think. " * (BIG // 14)
    content = reasoning + "</think>\n\nYes."
    v = _verifier().read(_choice(content))
    assert v.score == 1.0 and v.source == "parsed" and v.answer == "Yes."
    assert v.meta["raw_chars"] == len(content)
    assert v.meta["reasoning_chars"] == len(reasoning.strip())
    assert "answer_chars" not in v.meta
    assert len(json.dumps(v.to_json())) < 3 * CAP


def test_a_huge_verifier_answer_keeps_its_final_verdict_readable():
    answer = "The mask covers the cup. " * (BIG // 25) + "So: **no**"
    v = _verifier().read(_choice(answer))
    assert v.score == 0.0
    assert v.meta["answer_chars"] == len(answer) and len(v.answer) < CAP + 64
    assert answers.parse_yes_no(v.answer) == 0.0  # re-scoring the stored answer agrees


def test_a_small_verifier_reply_is_stored_as_it_was():
    v = _verifier().read(_choice("<think>ok</think>Yes."))
    assert (v.reasoning, v.answer, v.raw) == ("ok", "Yes.", "<think>ok</think>Yes.")
    assert not {"raw_chars", "reasoning_chars", "answer_chars"} & set(v.meta)
