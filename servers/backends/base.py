"""The seam between the HTTP server and a segmentation model.

A backend encodes an image once (`encode` → an opaque state the server caches by pixel digest)
and then answers any number of prompts against that state (`segment`). The split is what lets
64 hypotheses on one image cost one image-encoder pass. Backends import torch/sam3/transformers
inside `load()`, never at module import, so the server runs without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rescue import masks
from rescue.hypothesis import Prompt
from rescue.masks import Rle


@dataclass(frozen=True)
class Instance:
    """One mask with its confidence; `box` is the tight box of the mask (None when empty)."""

    rle: Rle
    score: float
    box: tuple[float, float, float, float] | None


@dataclass(frozen=True)
class PromptResult:
    """The answer to one prompt: instances (best first), or why there are none."""

    instances: list[Instance] = field(default_factory=list)
    error: str | None = None

    @classmethod
    def failed(cls, reason: str) -> PromptResult:
        return cls(instances=[], error=reason)


@dataclass(frozen=True)
class SegmentOptions:
    multimask: bool = False
    max_instances: int = 16


@dataclass(frozen=True)
class BackendInfo:
    """What /v1/info reports. `identity` holds everything that can change a mask."""

    backend: str
    model: str
    backend_version: str
    device: str
    capabilities: dict[str, bool]
    identity: dict[str, Any]


@runtime_checkable
class SegmenterBackend(Protocol):
    name: str

    def load(self) -> None:
        """Load weights (slow; the server runs it in a thread while /health says 'loading')."""
        ...

    def info(self) -> BackendInfo: ...

    def encode(self, image: np.ndarray) -> Any:
        """The per-image state: image features computed once, reused by every prompt."""
        ...

    def segment(self, state: Any, prompts: Sequence[Prompt],
                options: SegmentOptions) -> list[PromptResult]:
        """One result per prompt, in order. A prompt that fails becomes a failed result;
        raising means the whole batch failed (the server answers 500 backend_error)."""
        ...


def instance_from_mask(mask: np.ndarray, score: float) -> Instance:
    m = np.asarray(mask, dtype=bool)
    return Instance(rle=masks.encode(m), score=clamp01(score), box=masks.bbox(m))


def clamp01(v: float) -> float:
    v = float(v)
    if not np.isfinite(v):
        return 0.0
    return min(1.0, max(0.0, v))


def best_first(instances: Sequence[Instance], limit: int) -> list[Instance]:
    return sorted(instances, key=lambda i: -i.score)[: max(0, limit)]
