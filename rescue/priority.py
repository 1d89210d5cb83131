"""Earliest sample first: every limited resource of a run (an endpoint's requests in flight, a
client's worker threads) serves the waiter of the earliest-admitted sample before later ones.

With first-in-first-out limits, the samples in flight share every server equally, so they all
finish together, and the next wave starts with an empty verifier while it is planned and
segmented (a measured gap of a quarter of the run at max_n 64). Served earliest-first, samples
finish one after another and a new one is planned while the others are verified, so the
bottleneck server never waits for the client.

The rank travels with the task (a ContextVar: asyncio copies it into every task a sample's work
spawns), so the models need no extra argument. Outside a run it is 0 and the
limits are plain FIFO semaphores.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from contextvars import ContextVar

_PRIORITY: ContextVar[int] = ContextVar("rescue_priority", default=0)


def set_rank(rank: int) -> None:
    """The running task's work, and that of the tasks and threads it starts from now on, waits
    with `rank` (lower goes first). Each asyncio task runs in its own copy of the context, so
    this never leaks into the task that created it."""
    _PRIORITY.set(int(rank))


def current() -> int:
    """The rank of the running task's work (0 outside `priority`)."""
    return _PRIORITY.get()


class PrioritySemaphore:
    """An asyncio semaphore whose waiters acquire in (rank, arrival) order. A released slot
    is handed to the next waiter directly, so a new arrival cannot overtake it. Bound to the
    event loop it first waits on (create one per loop)."""

    def __init__(self, value: int):
        if value < 1:
            raise ValueError(f"a semaphore needs >= 1 slot, got {value}")
        self._free = int(value)
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    def locked(self) -> bool:
        return self._free == 0

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (current(), next(self._arrivals), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed the slot, then cancelled: pass it on
                self.release()
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():  # cancelled waiters are skipped
                fut.set_result(None)
                return
        self._free += 1

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class Slots:
    """`value` slots of a `PrioritySemaphore`, one semaphore per event loop: a semaphore is
    bound to the loop it first waits on, and a client object outlives several `asyncio.run`
    calls (tests, notebooks). Call it for the running loop's."""

    def __init__(self, value: int):
        if value < 1:
            raise ValueError(f"a semaphore needs >= 1 slot, got {value}")
        self.value = int(value)
        self._bound: tuple[asyncio.AbstractEventLoop, PrioritySemaphore] | None = None

    def __call__(self) -> PrioritySemaphore:
        loop = asyncio.get_running_loop()
        if self._bound is None or self._bound[0] is not loop:
            self._bound = (loop, PrioritySemaphore(self.value))
        return self._bound[1]
