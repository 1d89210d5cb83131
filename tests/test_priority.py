"""rescue.priority: waiters acquire in (rank, arrival) order, a cancelled waiter loses no slot,
and a rank set in one task stays in that task and the tasks it starts."""

from __future__ import annotations

import asyncio

import pytest

from rescue.priority import PrioritySemaphore, Slots, current, set_rank


def test_waiters_acquire_by_rank_then_arrival():
    order: list[tuple[int, int]] = []

    async def main() -> None:
        sem = PrioritySemaphore(1)
        await sem.acquire()  # held: everyone below queues

        async def waiter(rank: int, k: int) -> None:
            set_rank(rank)
            async with sem:
                order.append((rank, k))

        tasks = [asyncio.create_task(waiter(r, k)) for k, r in enumerate([3, 1, 2, 1, 0])]
        await asyncio.sleep(0)  # all queued
        sem.release()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert order == [(0, 4), (1, 1), (1, 3), (2, 2), (3, 0)]


def test_a_new_arrival_cannot_overtake_a_released_slot():
    order: list[str] = []

    async def main() -> None:
        sem = PrioritySemaphore(1)
        await sem.acquire()

        async def waiter(name: str, rank: int) -> None:
            set_rank(rank)
            async with sem:
                order.append(name)

        queued = asyncio.create_task(waiter("queued", 5))
        await asyncio.sleep(0)
        sem.release()  # handed to "queued" directly
        late = asyncio.create_task(waiter("late", 0))  # better rank, but arrives after
        await asyncio.gather(queued, late)

    asyncio.run(main())
    assert order == ["queued", "late"]


@pytest.mark.parametrize("when", ["waiting", "handed"])
def test_a_cancelled_waiter_loses_no_slot(when):
    async def main() -> int:
        sem = PrioritySemaphore(2)
        await sem.acquire()
        await sem.acquire()
        victim = asyncio.create_task(sem.acquire())
        await asyncio.sleep(0)
        if when == "handed":
            sem.release()  # the slot goes to the victim's future, then it is cancelled
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        if when == "waiting":
            sem.release()
        sem.release()
        got = 0
        for _ in range(3):  # exactly the two slots are free again
            try:
                await asyncio.wait_for(sem.acquire(), 0.05)
                got += 1
            except TimeoutError:
                pass
        return got

    assert asyncio.run(main()) == 2


def test_a_rank_stays_in_its_task_and_reaches_its_children():
    async def main() -> tuple[int, int, int]:
        async def sample() -> tuple[int, int]:
            set_rank(7)
            child = await asyncio.create_task(asyncio.sleep(0, result=current()))
            return current(), child

        own, child = await asyncio.create_task(sample())
        return own, child, current()

    assert asyncio.run(main()) == (7, 7, 0)


def test_a_semaphore_needs_a_slot():
    with pytest.raises(ValueError, match=">= 1 slot"):
        PrioritySemaphore(0)
    with pytest.raises(ValueError, match=">= 1 slot"):
        Slots(0)


def test_slots_are_one_semaphore_per_event_loop():
    slots = Slots(1)

    async def twice() -> PrioritySemaphore:
        assert slots() is slots()
        async with slots():  # a semaphore left held by a dead loop does not bind the next
            return slots()

    first, second = asyncio.run(twice()), asyncio.run(twice())
    assert first is not second


def test_an_endpoint_and_a_worker_pool_serve_the_earliest_sample_first():
    from rescue.models.http import Endpoint
    from rescue.models.workers import WorkerPool

    served: list[tuple[str, int]] = []

    async def main() -> None:
        endpoint, pool = Endpoint("verifier", "http://x", max_concurrency=1), WorkerPool("p", 1)
        gate = asyncio.Event()

        async def request(rank: int) -> None:
            set_rank(rank)
            await endpoint.call(lambda: gate.wait() if rank < 0 else asyncio.sleep(0))
            served.append(("endpoint", rank))
            await pool.run(served.append, ("pool", rank))

        first = asyncio.create_task(request(-1))  # holds the one slot until the gate opens
        await asyncio.sleep(0)
        rest = [asyncio.create_task(request(r)) for r in (4, 2, 3, 1)]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(first, *rest)
        pool.close()

    asyncio.run(main())
    assert [r for kind, r in served if kind == "endpoint"] == [-1, 1, 2, 3, 4]
    assert sorted(r for kind, r in served if kind == "pool") == [-1, 1, 2, 3, 4]
