"""Hostile planner text: the grounding parser's work stays linear in the text, and every such
answer is an invalid hypothesis with a stable reason, never an exception or a hang.

Work is counted by the parser's own `Budget` (characters scanned or decoded), not timed.
"""

from __future__ import annotations

import json

import pytest

from rescue.models.grounding import (
    MAX_DEPTH,
    MAX_PARSE_CHARS,
    WORK_PER_CHAR,
    Budget,
    Frame,
    extract_json,
    parse_grounding,
)
from rescue.records import reason_code

FRAME = Frame(width=640, height=480)
GOOD = '{"bbox_2d": [100, 200, 300, 400], "label": "cat"}'

HOSTILE = {
    "deep_lists": "[" * 20000,
    "deep_closed": "[" * 5000 + "]" * 5000,
    "unclosed_objects": '{"a": [' * 5000,
    "openers_in_prose": "see [ the { cat " * 4000,
    "many_small_values": "[1] " * 10000,
    "unterminated_string": '{"bbox_2d": "' + "x" * 50000,
    "escapes": '{"label": "' + "\\\\" * 20000 + '"',
    "nested_dicts": '{"a":' * 3000 + "1" + "}" * 3000,
    "python_literals": "[{'bbox_2d': (1, 2, 3, 4), 'x': None}" * 2000,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_text_costs_at_most_the_linear_budget(name: str) -> None:
    text = HOSTILE[name]
    found = extract_json(text)
    assert found.work <= WORK_PER_CHAR * len(text)
    h = parse_grounding(0, text, FRAME)
    assert not h.valid
    assert reason_code(h.error).startswith(("parse:", "ground:"))


@pytest.mark.parametrize("name", ["deep_lists", "unclosed_objects", "openers_in_prose",
                                  "many_small_values"])
def test_work_grows_linearly_when_the_text_doubles(name: str) -> None:
    """Quadratic rescanning (each opener re-scanned to the end) would show as 4x work."""
    text = HOSTILE[name]
    once, twice = extract_json(text).work, extract_json(text + text).work
    assert twice <= 2.2 * max(once, 1), (once, twice)


def test_a_value_nested_past_max_depth_is_skipped_and_a_later_answer_still_found() -> None:
    deep = "[" * (MAX_DEPTH + 12) + "]" * (MAX_DEPTH + 12)
    found = extract_json(deep + " " + GOOD)
    assert found.values[-1] == json.loads(GOOD)
    assert all(not isinstance(v, list) or _depth(v) <= MAX_DEPTH for v in found.values)
    h = parse_grounding(0, deep + " " + GOOD, FRAME)
    assert h.valid and h.prompt.box == pytest.approx((64.0, 96.0, 192.0, 192.0))


def _depth(value: object) -> int:
    return 1 + max(map(_depth, value), default=0) if isinstance(value, list) else 0


def test_an_exhausted_budget_stops_the_extraction_and_says_so() -> None:
    text = "[" * 4000
    found = extract_json(text, Budget(100))
    assert found.exhausted and found.work == 100 and found.values == []


def test_a_huge_answer_is_parsed_from_its_head_and_marked_cut_off() -> None:
    text = "[" + GOOD + "," + ", ".join([GOOD] * (2 * MAX_PARSE_CHARS // len(GOOD))) + "]"
    assert len(text) > MAX_PARSE_CHARS
    h = parse_grounding(0, text, FRAME)
    assert h.valid and h.meta.get("truncated") is True


def test_a_huge_answer_without_an_object_in_its_head_is_too_long() -> None:
    text = "nothing here " * (MAX_PARSE_CHARS // 10) + GOOD
    h = parse_grounding(0, text, FRAME)
    assert not h.valid and reason_code(h.error) == "parse:too_long"


@pytest.mark.parametrize(("template", "per_char"), [
    ("{}", 3), ("```json\n{}\n```", 3),
    ("Here [ is {{ the answer: {}", 8),  # a stray opener sends the text through the repairs
])
def test_real_answers_spend_a_small_part_of_the_budget(template: str, per_char: int) -> None:
    """The budget is a hard stop that a real answer stays far below."""
    text = template.format(json.dumps([json.loads(GOOD)] * 5))
    found = extract_json(text)
    assert not found.exhausted and found.work <= per_char * len(text) < WORK_PER_CHAR * len(text)
    h = parse_grounding(0, f"<think>hm [ {{</think>{text}", FRAME)
    assert h.valid and h.meta["n_objects"] == 5
