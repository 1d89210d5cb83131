"""A client's CPU work (drawing views, encoding images, parsing answers) off the event loop,
in a thread pool sized to the cores.

The event loop only moves bytes: a view drawn or a JPEG encoded on it would stall every other
request in flight. PIL's encoders and OpenCV's drawing release the GIL, so threads run them in
parallel; more threads than cores would only queue. Parsing a model's answer is pure Python and
holds the GIL, but in a thread it yields to the loop at every switch interval, so a hostile
answer (up to a second of parsing) delays the other requests by milliseconds, not by the whole
parse; a short one (`INLINE_SIZE`) is read on the loop, where it costs less than the trip.
Each client owns its pool (no global state, OpenCV's thread count aside: the verifier's pool
makes OpenCV serial, `views.serial_opencv`) and closes it with the client.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from rescue.priority import Slots

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


def cores() -> int:
    """Cores this process may use (its CPU affinity where the OS tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


INLINE_SIZE = 16_384
"""Text a worker pool's `parse` reads on the calling thread: at most a millisecond's work."""


class WorkerPool:
    """A lazily started ThreadPoolExecutor with `workers` threads (default: the cores). Work
    is handed to it earliest sample first (rescue.priority): the executor's own queue is FIFO,
    so at most `workers` items are queued in it at once. `initializer` runs in each thread as
    it starts (the verifier's: `views.serial_opencv`)."""

    def __init__(self, name: str, workers: int | None = None,
                 initializer: Callable[[], None] | None = None):
        self.name = name
        self.workers = int(workers or cores())
        if self.workers < 1:
            raise ValueError(f"{name}: workers must be >= 1, got {workers}")
        self.initializer = initializer
        self._pool: ThreadPoolExecutor | None = None
        self._slots = Slots(self.workers)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name,
                                            initializer=self.initializer)
        async with self._slots():
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def parse(self, size: int, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` reading untrusted text of about `size` characters: on the calling
        thread up to `INLINE_SIZE` (a trip to the pool and back costs the loop more than
        reading a short reply: a two-step verdict's reply of a few kB takes ~0.1 ms), in the
        pool beyond it (a long or hostile answer must not stall the loop)."""
        if size <= INLINE_SIZE:
            return fn(*args)
        return await self.run(fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class Memo(Generic[K, T]):
    """The last `size` results by key (least recently used dropped): a mask's encoded views
    are drawn once however many calls show it (pairwise arenas show each mask many times).
    Used from the event loop only, so it needs no lock."""

    def __init__(self, size: int = 256):
        self.size = int(size)
        self._items: OrderedDict[K, T] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> T | None:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return value

    def put(self, key: K, value: T) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
