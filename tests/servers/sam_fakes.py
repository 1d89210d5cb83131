"""Stand-in backends for the SAM server tests, loaded by the server subprocess through
`--backend sam_fakes:<factory>` (tests/servers is on its PYTHONPATH), or in-process by tests
anywhere under tests/ (pyproject's pytest `pythonpath`). They make the server's own paths
(admission, readiness, errors) observable without a model."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from rescue.hypothesis import Prompt
from servers.backends.base import BackendInfo, PromptResult, SegmentOptions, instance_from_mask


def _wait_for(path: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.01)


class BoxBackend:
    """Answers every prompt with its box as the mask (score 0.5); hooks for the tests."""

    name = "fake"

    def __init__(self, segment_gate: str | None = None, load_gate: str | None = None,
                 load_error: str | None = None, segment_error: str | None = None) -> None:
        self.segment_gate, self.load_gate = segment_gate, load_gate
        self.load_error, self.segment_error = load_error, segment_error

    def load(self) -> None:
        if self.load_gate:
            _wait_for(self.load_gate)
        if self.load_error:
            raise RuntimeError(self.load_error)

    def info(self) -> BackendInfo:
        return BackendInfo(backend=self.name, model="box", backend_version="0", device="cpu",
                           capabilities={"text": False, "box": True, "points": False,
                                         "multimask": False},
                           identity={"backend": self.name})

    def encode(self, image: np.ndarray) -> Any:
        return image.shape[:2]

    def segment(self, state: Any, prompts: Sequence[Prompt],
                options: SegmentOptions) -> list[PromptResult]:
        if self.segment_gate:
            _wait_for(self.segment_gate)
        if self.segment_error:
            raise RuntimeError(self.segment_error)
        h, w = state
        out = []
        for p in prompts:
            if p.box is None:
                out.append(PromptResult.failed("box backend needs a box"))
                continue
            m = np.zeros((h, w), bool)
            x1, y1, x2, y2 = (round(v) for v in p.box)
            m[y1:y2, x1:x2] = True
            out.append(PromptResult(instances=[instance_from_mask(m, 0.5)]))
        return out


class LatencyBackend(BoxBackend):
    """A GPU of fixed latency for the client benchmarks: every request takes `latency_s`
    (the server's --max-in-flight is its capacity), each prompt answered with its box, or the
    whole image without one. Claims text prompts so the shipped sam3 config runs against it."""

    name = "latency"

    def __init__(self, latency_s: float = 0.1) -> None:
        super().__init__()
        self.latency_s = float(latency_s)

    def info(self) -> BackendInfo:
        return BackendInfo(backend=self.name, model="box", backend_version="0", device="cpu",
                           capabilities={"text": True, "box": True, "points": True,
                                         "multimask": False},
                           identity={"backend": self.name, "latency_s": self.latency_s})

    def segment(self, state: Any, prompts: Sequence[Prompt],
                options: SegmentOptions) -> list[PromptResult]:
        time.sleep(self.latency_s)
        h, w = state
        out = []
        for p in prompts:
            m = np.zeros((h, w), bool)
            x1, y1, x2, y2 = (round(v) for v in (p.box or (0, 0, w, h)))
            m[y1:y2, x1:x2] = True
            out.append(PromptResult(instances=[instance_from_mask(m, 0.5)]))
        return out
