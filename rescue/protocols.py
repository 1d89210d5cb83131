"""The three seams of the method: Planner, Executor, Verifier, and the values that cross them.

A real HTTP client and an in-process simulator satisfy the same Protocol, so the pipeline, the
cache and the evaluation never know which one they talk to.

`identity()` returns everything about a model that can change its answer (model name, prompt
template text, sampling parameters, backend version); it is hashed into every cache key of the
stage. `simulated` marks models that read the ground truth: their outputs measure the framework,
never a model, and every record made with them says so.
"""

from __future__ import annotations

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
        Raising is reserved for transport failures after retries, as `TransportError` (the
        pipeline records them); any other exception is a defect.
        """
        ...


@runtime_checkable
class Executor(Protocol):
    simulated: bool

    def identity(self) -> Mapping[str, Any]: ...

    async def segment(self, sample: Sample, prompts: Sequence[Prompt]) -> list[Segmentation]:
        """One Segmentation per prompt, in order; all prompts of one image in one call. A call
        that does not get through raises `TransportError`."""
        ...


@runtime_checkable
class Verifier(Protocol):
    simulated: bool

    def identity(self) -> Mapping[str, Any]: ...

    async def verify(self, sample: Sample, mask: np.ndarray) -> Verdict: ...


@runtime_checkable
class Preflighted(Protocol):
    """A model that can tell, before a run, whether it is usable (endpoint up, the right model
    served; with `sample`, a real request of the run accepted). In-process models are not
    `Preflighted`: they are always ready."""

    async def preflight(self, sample: Sample | None = None) -> list[str]:
        """One line per problem; [] when ready."""
        ...


@runtime_checkable
class Closable(Protocol):
    """A model holding connections, to be closed when the run ends."""

    async def aclose(self) -> None: ...


@runtime_checkable
class Resolved(Protocol):
    """A model whose identity (part of every cache key) comes from a server it may fail to
    reach: `identity_problem()` says why it is not known, or is None."""

    def identity_problem(self) -> str | None: ...


@runtime_checkable
class Counted(Protocol):
    """A model that counts its requests, retries and failures (written to stats.json)."""

    def stats(self) -> dict[str, Any]: ...
