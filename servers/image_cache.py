"""LRU of decoded images and their encoder states, keyed by pixel digest.

The encoder pass is the expensive part of SAM3 (a ViT at 1008 px); prompts are cheap. Keeping
recent states lets the many requests a pipeline sends for one image (and the `sha256` re-use
path) skip both the upload and the encoder. Concurrent requests for the same new image share
one encode (single flight) instead of racing to compute it twice.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CachedImage:
    sha256: str
    image: np.ndarray
    state: Any

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


class ImageCache:
    """Thread-safe; `capacity` 0 keeps nothing (every request encodes)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = int(capacity)
        self._items: OrderedDict[str, CachedImage] = OrderedDict()
        self._pending: dict[str, Future[CachedImage]] = {}
        self._lock = threading.Lock()
        self.encodes = 0
        self.hits = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, sha256: str) -> CachedImage | None:
        with self._lock:
            item = self._items.get(sha256)
            if item is not None:
                self._items.move_to_end(sha256)
                self.hits += 1
            return item

    def get_or_encode(self, sha256: str, image: np.ndarray,
                      encode: Callable[[np.ndarray], Any]) -> tuple[CachedImage, bool]:
        """The cached entry (True) or a fresh encoding (False); one encode per key at a time."""
        with self._lock:
            item = self._items.get(sha256)
            if item is not None:
                self._items.move_to_end(sha256)
                self.hits += 1
                return item, True
            pending = self._pending.get(sha256)
            owner = pending is None
            if owner:
                pending = Future()
                self._pending[sha256] = pending
        assert pending is not None
        if not owner:
            item = pending.result()  # re-raises the owner's encode error
            with self._lock:
                self.hits += 1
            return item, True
        try:
            with self._lock:
                self.encodes += 1
            item = CachedImage(sha256=sha256, image=image, state=encode(image))
        except BaseException as exc:
            with self._lock:
                del self._pending[sha256]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._pending[sha256]
            if self.capacity > 0:
                self._items[sha256] = item
                self._items.move_to_end(sha256)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        pending.set_result(item)
        return item, False
