"""GrabCut behind the backend seam: CPU only, no weights (the demo, the tests, the CPU layout)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from rescue.hypothesis import Prompt
from rescue.models.classical import grabcut_segment
from servers.backends.base import BackendInfo, Instance, PromptResult, SegmentOptions


@dataclass(frozen=True)
class ClassicalState:
    """GrabCut has no image encoder: the state is the pixels (read-only, shared by threads)."""

    image: np.ndarray


class ClassicalBackend:
    """`grabcut_segment` per prompt, the prompts of a request spread over a thread pool
    (OpenCV releases the GIL). Text is ignored when a box or points are given; a text-only prompt
    is a per-prompt error."""

    name = "classical"

    def __init__(self, iterations: int = 5, max_side: int = 512, threads: int | None = None
                 ) -> None:
        if iterations < 1 or max_side < 8:
            raise ValueError("iterations >= 1 and max_side >= 8 required")
        self.iterations = int(iterations)
        self.max_side = int(max_side)
        self.threads = int(threads) if threads else max(1, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    def load(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="grabcut")

    def info(self) -> BackendInfo:
        return BackendInfo(
            backend=self.name, model="grabcut", backend_version=f"opencv {cv2.__version__}",
            device="cpu",
            capabilities={"text": False, "box": True, "points": True, "multimask": False},
            identity={"backend": self.name, "model": "grabcut", "iterations": self.iterations,
                      "max_side": self.max_side, "opencv": cv2.__version__},
        )

    def encode(self, image: np.ndarray) -> ClassicalState:
        arr = np.ascontiguousarray(image)
        arr.setflags(write=False)
        return ClassicalState(image=arr)

    def _one(self, image: np.ndarray, prompt: Prompt) -> PromptResult:
        try:
            seg = grabcut_segment(image, prompt, self.iterations, self.max_side)
        except Exception as exc:  # one bad prompt never fails the others
            return PromptResult.failed(f"execute:grabcut_failed {type(exc).__name__}: {exc}")
        if seg.error is not None or seg.rle is None:
            return PromptResult.failed(seg.error or "grabcut returned no mask")
        if seg.box is None:  # empty mask: nothing found
            return PromptResult(instances=[])
        return PromptResult(instances=[Instance(rle=seg.rle, score=float(seg.score or 0.0),
                                                box=seg.box)])

    def segment(self, state: Any, prompts: Sequence[Prompt],
                options: SegmentOptions) -> list[PromptResult]:
        self.load()
        assert self._pool is not None
        image = state.image
        return list(self._pool.map(lambda p: self._one(image, p), prompts))
