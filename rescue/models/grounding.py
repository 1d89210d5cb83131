"""Qwen-VL grounding output -> `Hypothesis`: a pure, forgiving parser of untrusted model text.

Qwen3-VL answers grounding requests with JSON such as
`[{"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y], "label": "red car"}]` in relative
coordinates on a 0-1000 scale; Qwen2.5-VL used absolute pixels of its internally resized input.
Which one applies is configuration (`Frame`), never guessed from the numbers.

Real outputs come wrapped in code fences, surrounded by prose, cut off at max_tokens, with
several objects, NaN, inverted or degenerate boxes, or coordinates outside the image. Every
failure becomes `Hypothesis.invalid` whose reason starts with a stable code (the part before the
first space), so failure tables can group them:

    parse:empty        no text at all
    parse:no_json      no JSON object or list anywhere in the text
    parse:truncated    cut off (finish_reason "length", or a [ or { still open) before a
                       single object was complete; checked before ground:no_object, since a
                       `[]` inside an unfinished answer is not the model's final word
    parse:bad_schema   JSON, but no object with a box, point or label
    ground:no_object   the model answered an empty list (it found nothing) and finished
    ground:empty_object  an object with none of box, point, label
    box:malformed      box is not four numbers
    box:nonfinite      NaN or infinity in the box
    box:out_of_image   box beyond the image by more than the tolerance (often a
                       coordinate-convention mismatch: absolute pixels read as 0-1000)
    box:degenerate     box thinner than `min_box_px` (default MIN_BOX_PX) after clipping
    point:invalid      no usable point and nothing else to go on

Several objects (policy `multi_object`): `first` (default: the first object decides, the others
are kept in `meta["others"]`), `first_valid` (the first object that parses), `union` (the box
enclosing every valid object's box, all their points; for "all the cups"-style queries).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rescue.hypothesis import Hypothesis, Prompt

COORDS = ("relative_1000", "absolute")
MULTI_OBJECT = ("first", "first_valid", "union")

BOX_KEYS = ("bbox_2d", "bbox", "box", "bounding_box", "bbox2d")
POINT_KEYS = ("point_2d", "points", "point", "points_2d", "point2d")
LABEL_KEYS = ("label", "name", "phrase", "category")
MAX_LABEL_CHARS = 200
"""Labels are cut to this; the structured-output schema's `maxLength` for them."""
MAX_OTHERS_KEPT = 8
MAX_OBJECTS = 32
"""The structured-output schema's `maxItems`: real Qwen3-VL lists reach 27 objects (a dining
table, QwenLM/Qwen3-VL cookbooks/2d_grounding.ipynb), and Qwen's cookbook warns that past 40-50
instances the model may loop endlessly; the cap keeps every real answer legal and ends a loop."""

MIN_BOX_PX = 1.0
"""A box narrower or shorter than this many pixels (after clipping to the image) is degenerate:
the one limit of the planner's parser, the classical executor and the SAM server's prompt check
(so every backend), so no stage accepts a box another refuses. One pixel because a thinner box
covers no whole mask pixel, so nothing can be segmented inside it, while anything wider may be
a real, small object (judging it is the verifier's job, not the parser's). It is the limit the
planner and the SAM server always had; the classical executor's former 2 px only turned 1-2 px
boxes into errors."""


# --- coordinate frames ----------------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """(height, width) that Qwen2-VL/2.5-VL's processor resizes an image to.

    Both sides become multiples of `factor` with the area kept within [min_pixels, max_pixels]
    (qwen-vl-utils' rule); absolute coordinates of those models live in this resized frame.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class Frame:
    """Maps the model's coordinates to pixels of the original image.

    relative_1000: x_px = x / 1000 * width.  absolute: x_px = x / model_width * width, where
    (model_width, model_height) is the image size the model saw.
    """

    width: int
    height: int
    coords: str = "relative_1000"
    model_width: int | None = None
    model_height: int | None = None

    def __post_init__(self) -> None:
        if self.coords not in COORDS:
            raise ValueError(f"coords must be one of {COORDS}, got {self.coords!r}")

    @property
    def extent(self) -> tuple[float, float]:
        """The model's coordinate range (x, y): 1000 for relative, the seen size for absolute."""
        if self.coords == "relative_1000":
            return 1000.0, 1000.0
        return float(self.model_width or self.width), float(self.model_height or self.height)

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        ex, ey = self.extent
        return x / ex * self.width, y / ey * self.height


def frame_for(width: int, height: int, coords: str = "relative_1000",
              resize: Mapping[str, Any] | None = None,
              sent_size: tuple[int, int] | None = None) -> Frame:
    """The frame of a planner whose image was sent at `sent_size` (w, h; default original).

    For absolute coordinates `resize` names the model's own resize rule: None (the model saw
    the sent image as is) or {"kind": "smart_resize", "factor": 28, "min_pixels": ...,
    "max_pixels": ...} (Qwen2.5-VL; the values must match the server's processor settings).
    """
    sw, sh = sent_size or (width, height)
    if coords != "absolute":
        return Frame(width, height, coords)
    r = dict(resize or {})
    kind = r.pop("kind", None)
    if kind is None:
        return Frame(width, height, coords, sw, sh)
    if kind != "smart_resize":
        raise ValueError(f"resize.kind must be smart_resize or absent, got {kind!r}")
    mh, mw = smart_resize(sh, sw, **r)
    return Frame(width, height, coords, mw, mh)


# --- structured output ----------------------------------------------------------------------


def grounding_schema(coords: str = "relative_1000") -> dict[str, Any]:
    """The JSON schema of a planner answer with `coords`, for `structured_output: true`.

    A grammar follows the schema token by token, so every bound here is one the model cannot
    break: integer coordinates (0-1000 for relative_1000; for absolute only >= 0, since the
    image size the model saw differs per sample and the parser's out-of-image check covers the
    rest), at most MAX_OBJECTS entries, labels of at most MAX_LABEL_CHARS, and only the keys the
    prompt asks for (`additionalProperties: false`; Qwen's habit of adding keys such as
    `name_en` or `confidence` is read only in free text). Whitespace between tokens cannot be
    bounded by a schema: vLLM's `--structured-outputs-config` `disable_any_whitespace` does that
    (see conf/planner/qwen3vl_8b_instruct.yaml).
    """
    if coords not in COORDS:
        raise ValueError(f"coords must be one of {COORDS}, got {coords!r}")
    coord: dict[str, Any] = {"type": "integer", "minimum": 0}
    if coords == "relative_1000":
        coord["maximum"] = 1000
    return {
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_OBJECTS,
        "items": {
            "type": "object",
            "properties": {
                "label": {"type": "string", "maxLength": MAX_LABEL_CHARS},
                "bbox_2d": {"type": "array", "items": dict(coord), "minItems": 4,
                            "maxItems": 4},
                "point_2d": {"type": "array", "items": dict(coord), "minItems": 2,
                             "maxItems": 2},
            },
            "required": ["label", "bbox_2d"],
            "additionalProperties": False,
        },
    }


# --- JSON extraction ------------------------------------------------------------------------
#
# Model text is untrusted: the extraction below is linear in the text's length whatever the
# text. Every character scanned or decoded is charged to a `Budget` of WORK_PER_CHAR per
# character parsed, a hard stop that real answers never reach; within it, three rules keep the
# work linear: an opener whose bracket never closes is not decoded (no JSON value can start
# there), one deeper than MAX_DEPTH is not decoded either, and each scan records the closing
# bracket of every opener it meets, so an inner value is never re-scanned.

MAX_PARSE_CHARS = 65536
"""Only the head of an answer this long is parsed (after the reasoning is stripped), and the
answer is then treated as cut off: real grounding answers are a few KB (MAX_OBJECTS entries of
~80 characters), so a longer one is a loop or hostile, and its first objects are all the
`first` policy reads anyway. With no complete object in the head it is `parse:too_long`."""
MAX_DEPTH = 8
"""Deepest nesting decoded: the deepest real answer nests 5 ({"objects": [{"points": [[x, y]]}]});
a value nested deeper is skipped and the values inside it are tried instead."""
WORK_PER_CHAR = 32
"""The budget of characters scanned or decoded per character parsed (`Budget`); spent only by
hostile text (the corpus in tests/test_grounding_hostile.py stays below MAX_DEPTH + 2)."""

_FENCE = re.compile(r"```[ \t]*(?:json|JSON|javascript|js)?[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_DECODER = json.JSONDecoder()
_OPENER = re.compile(r"[\[{]")
_SPECIAL = re.compile(r'[\[\]{}"\\]')
_TOO_DEEP = -1


class Budget:
    """Characters the extraction may still scan or decode: its work, bounded whatever the text."""

    def __init__(self, chars: int) -> None:
        self.left = int(chars)
        self.used = 0

    def spend(self, chars: int) -> bool:
        """Charge `chars`; False (and nothing left) when they exceed what is left."""
        if chars > self.left:
            self.used += self.left
            self.left = 0
            return False
        self.left -= chars
        self.used += chars
        return True

    @property
    def spent(self) -> bool:
        return self.left <= 0


def _strip_reasoning(text: str) -> str:
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    return text


def _regions(text: str) -> list[str]:
    """Where to look for JSON: fenced blocks first (an unclosed fence runs to the end), then
    the whole text."""
    blocks = [m.group(1) for m in _FENCE.finditer(text) if m.group(1).strip()]
    return [*blocks, text]


def _outside_strings(text: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """(index, char) for each [ ] { } outside JSON strings from `start`, and (index, " ") at
    every other special character (quotes, escapes, brackets inside strings) so that a caller
    can meter its work; last, (len(text), '"') when the text ends inside a string. One linear
    pass: `_SPECIAL` finds the candidates."""
    in_str, skip = False, -1
    for m in _SPECIAL.finditer(text, start):
        i = m.start()
        ch = text[i]
        if i < skip or ch == "\\" or in_str or ch == '"':
            if i >= skip and ch == "\\" and in_str:
                skip = i + 2
            elif i >= skip and ch == '"':
                in_str = not in_str
            yield i, " "
        else:
            yield i, ch
    if in_str:
        yield len(text), '"'


def _scan(text: str, start: int, budget: Budget, ends: dict[int, int | None]) -> None:
    """Match brackets from the opener at `start` (JSON strings skipped) and record in `ends`
    where each opener met outside a string closes (the index after its closer), None for those
    still open at the end of the text, `_TOO_DEEP` for `start` when its value nests deeper than
    MAX_DEPTH. Records nothing for `start` when the budget runs out first."""
    stack: list[int] = []
    stop = len(text)
    for i, ch in _outside_strings(text, start):
        if ch == '"':  # the text ended inside a string: what is open stays open
            continue
        if i - start > budget.left:
            budget.spend(i - start)
            return
        if ch in "[{":
            stack.append(i)
            if len(stack) > MAX_DEPTH:
                ends[start] = _TOO_DEEP
                stop = i + 1
                break
        elif ch in "]}":
            ends[stack.pop()] = i + 1
            if not stack:
                stop = i + 1
                break
    else:
        for k in stack:
            ends[k] = None
    budget.spend(stop - start)


def _decode_all(text: str, budget: Budget) -> tuple[list[Any], bool]:
    """Every top-level JSON object/list in `text`, left to right, not overlapping; and whether
    the first [ or { began one (if not, the outer value is broken and inner ones were found)."""
    out: list[Any] = []
    first_ok: bool | None = None
    ends: dict[int, int | None] = {}
    i = 0
    while not budget.spent:
        m = _OPENER.search(text, i)
        if m is None:
            break
        j = m.start()
        if j not in ends:
            _scan(text, j, budget, ends)
            if j not in ends:
                break
        end = ends[j]
        value, ok = None, False
        if end is not None and end != _TOO_DEEP and budget.spend(end - j):
            try:  # on the slice: a decode error's line count is then O(value), not O(text)
                value, stop = _DECODER.raw_decode(text[j:end])
                ok = stop == end - j
            except (json.JSONDecodeError, RecursionError):
                pass
        if ok:
            first_ok = True if first_ok is None else first_ok
            out.append(value)
            i = end  # type: ignore[assignment]
        else:
            first_ok = False if first_ok is None else first_ok
            i = j + 1
    return out, bool(first_ok)


_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_NAN = re.compile(r"(?<![\w\"'])nan(?![\w\"'])", re.I)
_INF = re.compile(r"(?<![\w\"'])inf(?:inity)?(?![\w\"'])", re.I)


def _repair(text: str, budget: Budget) -> list[Any]:
    """Near-JSON that models write: nan/inf, Python literals, single quotes, trailing commas."""
    m = _OPENER.search(text)
    if m is None:
        return []
    candidate = text[m.start():]
    end = max(candidate.rfind("]"), candidate.rfind("}"))
    if end < 0:
        return []
    candidate = _TRAILING_COMMA.sub(r"\1", candidate[: end + 1])
    candidate = _INF.sub("Infinity", _NAN.sub("NaN", candidate))
    values, ok = _decode_all(candidate, budget)
    if ok:
        return values
    fixed = re.sub(r"\bNone\b", "null", candidate)
    fixed = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", fixed))
    values, ok = _decode_all(fixed.replace("'", '"'), budget)
    if ok:
        return values
    if not budget.spend(len(candidate)):
        return []
    try:
        value = ast.literal_eval(candidate)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return []
    if isinstance(value, tuple):
        value = list(value)
    return [value] if isinstance(value, list | dict) else []


@dataclass(frozen=True)
class Extracted:
    """The JSON values found in one answer, and what finding them cost."""

    values: list[Any]
    saw_json: bool
    work: int
    exhausted: bool


def extract_json(text: str, budget: Budget | None = None) -> Extracted:
    """The values of the first region (fenced block, else the whole text) holding a grounding
    object or an empty list, near-JSON repaired; within `budget` (default WORK_PER_CHAR per
    character of `text`)."""
    budget = budget or Budget(WORK_PER_CHAR * max(1, len(text)))
    values: list[Any] = []
    saw_json = False
    for region in _regions(text):
        values, first_ok = _decode_all(region, budget)
        if not first_ok and not budget.spent:
            values = _repair(region, budget) or values
        saw_json = saw_json or bool(values)
        objs, saw_empty = _objects(values)
        if objs or saw_empty or budget.spent:
            break
    return Extracted(values, saw_json, budget.used, budget.spent)


def _unclosed(text: str) -> bool:
    """True when a [ or { is still open at the end of the text (strings skipped)."""
    depth = 0
    for _, ch in _outside_strings(text):
        if ch == '"':
            return True
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
    return depth > 0


def _is_object(d: Any) -> bool:
    return isinstance(d, dict) and any(k in d for k in (*BOX_KEYS, *POINT_KEYS, *LABEL_KEYS))


def _objects(values: Sequence[Any]) -> tuple[list[dict[str, Any]], bool]:
    """Grounding objects inside decoded values, and whether an empty list was among them."""
    objs: list[dict[str, Any]] = []
    saw_empty = False
    for v in values:
        if _is_object(v):
            objs.append(v)
        elif isinstance(v, list):
            if not v:
                saw_empty = True
            objs.extend(x for x in v if _is_object(x))
        elif isinstance(v, dict):  # a wrapper such as {"objects": [...]}
            for inner in v.values():
                if isinstance(inner, list):
                    if not inner:
                        saw_empty = True
                    objs.extend(x for x in inner if _is_object(x))
    return objs, saw_empty


# --- one object -----------------------------------------------------------------------------


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    return None


def _numbers(v: Any) -> list[float] | None:
    if isinstance(v, list | tuple):
        flat: list[Any] = []
        for x in v:
            flat.extend(x if isinstance(x, list | tuple) else [x])
        nums = [_number(x) for x in flat]
        return None if any(x is None for x in nums) else nums  # type: ignore[misc]
    if isinstance(v, str):  # "[10, 20, 30, 40]" or "10,20,30,40"
        parts = [p for p in re.split(r"[\s,\[\]()]+", v) if p]
        nums = [_number(p) for p in parts]
        return None if not nums or any(x is None for x in nums) else nums  # type: ignore[misc]
    return None


@dataclass
class _Parsed:
    box: tuple[float, float, float, float] | None
    points: list[tuple[float, float]]
    label: str | None
    error: str | None
    notes: list[str]

    @property
    def valid(self) -> bool:
        return self.error is None and (self.box is not None or bool(self.points)
                                       or bool(self.label))


def _fmt(vals: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in vals) + "]"


def _parse_box(raw: Any, frame: Frame, tol: float, min_box_px: float,
               notes: list[str]) -> tuple[tuple[float, float, float, float] | None, str | None]:
    nums = _numbers(raw)
    if nums is None or len(nums) != 4:
        return None, f"box:malformed {str(raw)[:60]}"
    if not all(math.isfinite(v) for v in nums):
        return None, f"box:nonfinite {_fmt(nums)}"
    x1, y1, x2, y2 = nums
    if x1 > x2 or y1 > y2:
        notes.append("reordered")
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
    ex, ey = frame.extent
    tx, ty = tol * ex, tol * ey
    if x1 < -tx or y1 < -ty or x2 > ex + tx or y2 > ey + ty:
        return None, f"box:out_of_image {_fmt(nums)} outside 0..{ex:g}x0..{ey:g}"
    cx1, cy1 = min(max(x1, 0.0), ex), min(max(y1, 0.0), ey)
    cx2, cy2 = min(max(x2, 0.0), ex), min(max(y2, 0.0), ey)
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
        notes.append("clipped")
    px1, py1 = frame.to_px(cx1, cy1)
    px2, py2 = frame.to_px(cx2, cy2)
    if px2 - px1 < min_box_px or py2 - py1 < min_box_px:
        return None, f"box:degenerate {_fmt(nums)}"
    return (px1, py1, px2, py2), None


def _point_list(raw: Any) -> list[Any]:
    if isinstance(raw, list | tuple) and len(raw) == 2 and all(
            not isinstance(v, list | tuple | dict) for v in raw):
        return [raw]  # a single [x, y]
    if isinstance(raw, list | tuple):
        return list(raw)
    return [raw]


def _parse_points(raw: Any, frame: Frame, tol: float,
                  notes: list[str]) -> tuple[list[tuple[float, float]], str | None]:
    pts: list[tuple[float, float]] = []
    problem = None
    ex, ey = frame.extent
    for p in _point_list(raw):
        if isinstance(p, dict):
            p = [p.get("x"), p.get("y")]
        nums = _numbers(p)
        if nums is None or len(nums) != 2:
            problem = f"point:invalid malformed {str(p)[:40]}"
            continue
        x, y = nums
        if not (math.isfinite(x) and math.isfinite(y)):
            problem = f"point:invalid nonfinite {_fmt(nums)}"
            continue
        if x < -tol * ex or y < -tol * ey or x > ex * (1 + tol) or y > ey * (1 + tol):
            problem = f"point:invalid out_of_image {_fmt(nums)}"
            continue
        pts.append(frame.to_px(min(max(x, 0.0), ex), min(max(y, 0.0), ey)))
    if problem is not None:
        notes.append("dropped_points")
    return pts, problem


def _label(obj: Mapping[str, Any]) -> str | None:
    for k in LABEL_KEYS:
        v = obj.get(k)
        if isinstance(v, str) and v.strip():
            return " ".join(v.split())[:MAX_LABEL_CHARS]
    return None


def _parse_object(obj: Mapping[str, Any], frame: Frame, tol: float,
                  min_box_px: float) -> _Parsed:
    notes: list[str] = []
    label = _label(obj)
    box_key = next((k for k in BOX_KEYS if k in obj), None)
    point_key = next((k for k in POINT_KEYS if k in obj), None)
    box = None
    if box_key is not None:
        box, err = _parse_box(obj[box_key], frame, tol, min_box_px, notes)
        if err is not None:
            return _Parsed(None, [], label, err, notes)
    points: list[tuple[float, float]] = []
    if point_key is not None:
        points, problem = _parse_points(obj[point_key], frame, tol, notes)
        if not points and box is None and problem is not None:
            return _Parsed(None, [], label, problem, notes)
    if box is None and not points and not label:
        return _Parsed(None, [], None, "ground:empty_object no box, point or label", notes)
    return _Parsed(box, points, label, None, notes)


# --- the parser -----------------------------------------------------------------------------


def parse_grounding(index: int, raw: str | None, frame: Frame, *, multi_object: str = "first",
                    tolerance: float = 0.05, min_box_px: float = MIN_BOX_PX,
                    finish_reason: str | None = None) -> Hypothesis:
    """Hypothesis `index` from the planner's text `raw`; never raises on bad model output.

    `tolerance` is how far (fraction of the frame) a coordinate may lie outside the image and
    still be clipped rather than rejected.
    """
    if multi_object not in MULTI_OBJECT:
        raise ValueError(f"multi_object must be one of {MULTI_OBJECT}, got {multi_object!r}")
    raw = raw or ""
    meta: dict[str, Any] = {}
    if finish_reason is not None:
        meta["finish_reason"] = finish_reason
    text = _strip_reasoning(raw)
    if not text.strip():
        return Hypothesis.invalid(index, raw, "parse:empty no text", **meta)

    cut = len(text) > MAX_PARSE_CHARS
    head = text[:MAX_PARSE_CHARS] if cut else text
    found = extract_json(head)
    objs, saw_empty = _objects(found.values)
    truncated = cut or finish_reason == "length" or _unclosed(head)
    if not objs:
        if cut or found.exhausted:
            return Hypothesis.invalid(
                index, raw, f"parse:too_long no complete object in the first "
                f"{min(len(text), MAX_PARSE_CHARS)} characters", **meta)
        if truncated:  # before the empty list: an unfinished answer has not said "nothing"
            return Hypothesis.invalid(index, raw, "parse:truncated no complete object", **meta)
        if saw_empty:
            return Hypothesis.invalid(index, raw, "ground:no_object empty list", **meta)
        if found.saw_json:
            return Hypothesis.invalid(index, raw, "parse:bad_schema no box, point or label",
                                      **meta)
        return Hypothesis.invalid(index, raw, "parse:no_json", **meta)

    if truncated:
        meta["truncated"] = True
    meta["n_objects"] = len(objs)
    parsed = [_parse_object(o, frame, tolerance, min_box_px) for o in objs]

    if multi_object == "union":
        chosen_ids = [i for i, p in enumerate(parsed) if p.valid]
    elif multi_object == "first_valid":
        chosen_ids = [next((i for i, p in enumerate(parsed) if p.valid), 0)]
    else:
        chosen_ids = [0]
    if not chosen_ids or not parsed[chosen_ids[0]].valid:
        first = parsed[0]
        if len(objs) > 1:
            meta["others"] = objs[1:1 + MAX_OTHERS_KEPT]
        return Hypothesis.invalid(index, raw, str(first.error), **meta)

    chosen = [parsed[i] for i in chosen_ids]
    others = [o for i, o in enumerate(objs) if i not in chosen_ids]
    if others:
        meta["others"] = others[:MAX_OTHERS_KEPT]
    boxes = [p.box for p in chosen if p.box is not None]
    box = None
    if boxes:
        box = (min(b[0] for b in boxes), min(b[1] for b in boxes),
               max(b[2] for b in boxes), max(b[3] for b in boxes))
    points = [pt for p in chosen for pt in p.points]
    label = next((p.label for p in chosen if p.label), None)
    notes = sorted({n for p in chosen for n in p.notes})
    if notes:
        meta["notes"] = notes
    prompt = Prompt(text=label, box=box, points=tuple(points),
                    point_labels=tuple(1 for _ in points))
    return Hypothesis(index=index, prompt=prompt.canonical(), raw=raw, label=label, meta=meta)
