"""A grounding hypothesis from the planner, and the executor prompt it becomes.

Parsing a model's text into a `Hypothesis` lives with the model's client
(`rescue.models.grounding` for Qwen-VL JSON); this module holds the data both sides agree on.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rescue.cache import canonical_json
from rescue.sample import Box


def _round(v: float) -> float:
    return round(float(v), 2)


@dataclass(frozen=True)
class Prompt:
    """What the executor is asked: a phrase and/or a box and/or points, all in pixels.

    The canonical form (normalised whitespace and case, coordinates rounded to 1/100 px) is what
    identical-prompt dedupe and the execute-stage cache key are computed from.
    """

    text: str | None = None
    box: Box | None = None
    points: tuple[tuple[float, float], ...] = ()
    point_labels: tuple[int, ...] = ()
    _is_canonical: ClassVar[bool] = False  # set on the canonical form's instance only

    def canonical(self) -> Prompt:
        """The canonical form; a canonical prompt is its own (it is asked of the parsed prompt,
        of the prompt read back from the cache and of the executor's, several times each)."""
        return self if self._is_canonical else self._canonical

    @functools.cached_property
    def _canonical(self) -> Prompt:
        text = " ".join(self.text.split()).lower() if self.text else None
        box = tuple(_round(v) for v in self.box) if self.box is not None else None
        points = tuple((_round(x), _round(y)) for x, y in self.points)
        labels = tuple(int(v) for v in self.point_labels)
        out = Prompt(text=text or None, box=box, points=points, point_labels=labels)  # type: ignore[arg-type]
        # frozen, so set directly; not a field, so `dataclasses.replace` of it is unmarked
        object.__setattr__(out, "_is_canonical", True)
        return out

    def to_json(self) -> dict[str, Any]:
        c = self.canonical()
        out: dict[str, Any] = {}
        if c.text is not None:
            out["text"] = c.text
        if c.box is not None:
            out["box"] = list(c.box)
        if c.points:
            out["points"] = [list(p) for p in c.points]
            out["point_labels"] = list(c.point_labels)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Prompt:
        return cls(
            text=d.get("text"),
            box=tuple(d["box"]) if d.get("box") is not None else None,  # type: ignore[arg-type]
            points=tuple(tuple(p) for p in d.get("points", ())),  # type: ignore[misc]
            point_labels=tuple(d.get("point_labels", ())),
        ).canonical()

    @functools.cached_property
    def canonical_json(self) -> str:
        """`to_json` in the cache keys' canonical JSON, once: what `key` hashes, and the
        execute stage's cache key splices in (`cache.Canonical`)."""
        return canonical_json(self.to_json())

    @functools.cached_property
    def key(self) -> str:
        """Short content hash of the canonical prompt (computed once: a prompt is immutable and
        its key is asked for at every stage, dedupe, cache and scoring)."""
        return hashlib.sha256(self.canonical_json.encode()).hexdigest()[:16]

    @property
    def empty(self) -> bool:
        return self.text is None and self.box is None and not self.points


@dataclass(frozen=True)
class Hypothesis:
    """Hypothesis `index` of a sample: either a prompt or the reason it is invalid.

    Invalid hypotheses still count as drawn (index i was sampled); evaluation treats them as an
    empty prediction that no selector prefers, so best-of-N is not biased by dropping them.
    """

    index: int
    prompt: Prompt | None
    raw: str = ""
    error: str | None = None
    label: str | None = None  # the planner's own name for the object, if it gave one
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. finish_reason, tokens

    @property
    def valid(self) -> bool:
        return self.error is None and self.prompt is not None and not self.prompt.empty

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "prompt": self.prompt.to_json() if self.prompt is not None else None,
            "raw": self.raw,
            "error": self.error,
            "label": self.label,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Hypothesis:
        p = d.get("prompt")
        return cls(
            index=int(d["index"]),
            prompt=Prompt.from_json(p) if p is not None else None,
            raw=d.get("raw", ""),
            error=d.get("error"),
            label=d.get("label"),
            meta=dict(d.get("meta") or {}),
        )

    @classmethod
    def invalid(cls, index: int, raw: str, reason: str, **meta: Any) -> Hypothesis:
        return cls(index=index, prompt=None, raw=raw, error=reason, meta=meta)


def contiguous_runs(indices: Sequence[int], max_len: int) -> list[tuple[int, int]]:
    """(start, count) runs covering the distinct indices, each at most `max_len` long.

    Hypothesis i is sampled with seed base_seed + i, and vLLM gives child k of a request with
    `n` the seed `seed + k`: a contiguous run of indices is one request.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    runs: list[tuple[int, int]] = []
    for i in sorted(set(int(v) for v in indices)):
        if runs and runs[-1][0] + runs[-1][1] == i and runs[-1][1] < max_len:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs
