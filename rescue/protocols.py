"""The three seams of the method: Planner, Executor, Verifier, and the values that cross them.

A real HTTP client and an in-process simulator satisfy the same Protocol, so the pipeline, the
cache and the evaluation never know which one they talk to.

`identity()` returns everything about a model that can change its answer (model name, prompt
template text, sampling parameters, backend version); it is hashed into every cache key of the
stage. `simulated` marks models that read the ground truth: their outputs measure the framework,
never a model, and every record made with them says so.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rescue.hypothesis import Hypothesis, Prompt
from rescue.masks import Rle
from rescue.sample import Box, Sample


@dataclass(frozen=True)
class Segmentation:
    """The executor's answer to one prompt: a mask, or the reason there is none."""

    rle: Rle | None
    score: float | None = None
    box: Box | None = None
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. number of instances merged

    @property
    def ok(self) -> bool:
        return self.error is None and self.rle is not None

    def to_json(self) -> dict[str, Any]:
        return {"rle": self.rle, "score": self.score,
                "box": list(self.box) if self.box is not None else None,
                "error": self.error, "meta": self.meta}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Segmentation:
        box = d.get("box")
        return cls(rle=d.get("rle"), score=d.get("score"),
                   box=tuple(box) if box is not None else None,  # type: ignore[arg-type]
                   error=d.get("error"), meta=dict(d.get("meta") or {}))


@dataclass(frozen=True)
class Verdict:
    """The verifier's judgement of one candidate mask. `score` is in [0, 1], higher is better."""

    score: float | None
    answer: str = ""
    reasoning: str = ""
    raw: str = ""
    source: str = ""  # "logprobs" | "parsed" | "simulated"
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.score is not None

    def to_json(self) -> dict[str, Any]:
        return {"score": self.score, "answer": self.answer, "reasoning": self.reasoning,
                "raw": self.raw, "source": self.source, "error": self.error, "meta": self.meta}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Verdict:
        return cls(score=d.get("score"), answer=d.get("answer", ""),
                   reasoning=d.get("reasoning", ""), raw=d.get("raw", ""),
                   source=d.get("source", ""), error=d.get("error"),
                   meta=dict(d.get("meta") or {}))


@runtime_checkable
class Planner(Protocol):
    simulated: bool

    def identity(self) -> Mapping[str, Any]: ...

    async def plan(self, sample: Sample, indices: Sequence[int]) -> list[Hypothesis]:
        """Hypotheses for exactly `indices` (hypothesis i drawn with seed base_seed + i).

        Must return one Hypothesis per index, in order; a failure becomes an invalid hypothesis.
        Raising is reserved for transport failures after retries (the pipeline records them).
        """
        ...


@runtime_checkable
class Executor(Protocol):
    simulated: bool

    def identity(self) -> Mapping[str, Any]: ...

    async def segment(self, sample: Sample, prompts: Sequence[Prompt]) -> list[Segmentation]:
        """One Segmentation per prompt, in order; all prompts of one image in one call."""
        ...


@runtime_checkable
class Verifier(Protocol):
    simulated: bool

    def identity(self) -> Mapping[str, Any]: ...

    async def verify(self, sample: Sample, mask: np.ndarray) -> Verdict: ...


async def preflight(model: object, sample: Sample | None = None) -> list[str]:
    """Problems that make `model` unusable (endpoint down, wrong model name, a request the
    server refuses); [] when ready. With `sample`, clients that take one probe a real request
    of the run on it.

    Models without a `preflight` coroutine (in-process ones) are always ready.
    """
    check = getattr(model, "preflight", None)
    if check is None:
        return []
    if sample is not None and "sample" in inspect.signature(check).parameters:
        return list(await check(sample=sample))
    return list(await check())


async def aclose(model: object) -> None:
    close = getattr(model, "aclose", None)
    if close is not None:
        await close()
