"""One evaluation sample: an image, a referring query and its ground-truth mask."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np

IGNORE = 255
"""Ground-truth label excluded from intersection and union (ReasonSeg's 'ignore' shapes)."""

Box = tuple[float, float, float, float]
"""A box in absolute pixels, (x1, y1, x2, y2), x to the right, y down."""


def image_digest(image: np.ndarray) -> str:
    """sha256 of the decoded pixels (or any array) and their shape.

    Hashing pixels rather than the file makes the key independent of how a dataset stores the
    image (JPEG in a folder, bytes in a parquet row), so every layout shares cache entries.
    """
    arr = np.ascontiguousarray(image)
    h = hashlib.sha256()
    h.update(f"{arr.shape}|{arr.dtype.str}|".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class Sample:
    """A loaded sample.

    `gt` holds 0 (background), 1 (target) and `IGNORE`. `distractors` are boxes of other objects
    when the dataset knows them (the synthetic scenes do); only simulated models read `gt` and
    `distractors`, a real model sees `image` and `query` alone.
    """

    sample_id: str
    query: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    gt: np.ndarray  # (H, W) uint8
    dataset: str = ""
    distractors: tuple[Box, ...] = ()
    target_boxes: tuple[Box, ...] = ()
    tags: tuple[str, ...] = ()  # e.g. ("long",) for ReasonSeg's long-query subset

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"{self.sample_id}: image must be (H, W, 3) uint8, got "
                             f"{self.image.shape} {self.image.dtype}")
        if self.gt.shape != self.image.shape[:2]:
            raise ValueError(f"{self.sample_id}: gt shape {self.gt.shape} != image "
                             f"{self.image.shape[:2]}")

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @cached_property
    def image_sha256(self) -> str:
        return image_digest(self.image)

    @cached_property
    def truth_sha256(self) -> str:
        """Digest of what a simulated model reads besides the image: the truth and the boxes."""
        h = hashlib.sha256(image_digest(self.gt).encode())
        h.update(json.dumps([self.target_boxes, self.distractors]).encode())
        return h.hexdigest()

    @property
    def target(self) -> np.ndarray:
        """Boolean target mask (ignore pixels are not target)."""
        return self.gt == 1

    @property
    def ignore(self) -> np.ndarray:
        return self.gt == IGNORE
