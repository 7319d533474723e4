"""The admission queue on its own: order, bound, deadline and hand-off of an unused turn.

`pick` here is a pool of sessions the test frees by hand (the scheduler's pick over real
placements is tested in tests/unit/test_scheduler.py)."""

from __future__ import annotations

import asyncio

import pytest

from mesh.admission import AdmissionQueue
from mesh.errors import CapacityExhausted, Unavailable


class Pool:
    def __init__(self, free: int) -> None:
        self.free = free
        self.gone = False  # no placement at all (one failed and is being repaired)
        self.block = asyncio.Event()  # a pick waits on it while `stall` is set
        self.stall = False
        self.picks = 0

    async def pick(self) -> int:
        self.picks += 1
        if self.stall:
            await self.block.wait()
        if self.gone:
            raise Unavailable("no node serving this model is ready")
        if self.free <= 0:
            raise CapacityExhausted("full")
        self.free -= 1
        return self.picks


def test_waiters_are_served_first_come_first_served_and_newcomers_queue_behind() -> None:
    async def scenario() -> None:
        queue, pool = AdmissionQueue(), Pool(free=1)
        assert await queue.admit(pool.pick, limit=4, wait_s=5) == 1
        order: list[str] = []

        async def ask(name: str) -> None:
            await queue.admit(pool.pick, limit=4, wait_s=5)
            order.append(name)

        tasks = [asyncio.create_task(ask(n)) for n in "abc"]
        await asyncio.sleep(0.05)
        assert len(queue) == 3 and not order
        for expected in ("a", "ab", "abc"):
            pool.free += 1
            queue.wake()
            await asyncio.sleep(0.05)
            assert "".join(order) == expected
        await asyncio.gather(*tasks)
        assert len(queue) == 0

    asyncio.run(scenario())


def test_a_full_queue_refuses_and_no_queue_refuses_at_once() -> None:
    async def scenario() -> None:
        queue, pool = AdmissionQueue(), Pool(free=0)
        with pytest.raises(CapacityExhausted, match="full"):
            await queue.admit(pool.pick, limit=0, wait_s=5)
        waiting = [asyncio.create_task(queue.admit(pool.pick, limit=2, wait_s=5)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(CapacityExhausted, match=r"2 request\(s\) already wait in the queue"):
            await queue.admit(pool.pick, limit=2, wait_s=5)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert len(queue) == 0

    asyncio.run(scenario())


def test_a_wait_ends_at_its_deadline_and_a_new_placement_is_found_without_a_wake() -> None:
    async def scenario() -> None:
        queue, pool = AdmissionQueue(), Pool(free=0)
        with pytest.raises(CapacityExhausted, match="stayed at capacity for the 1 s"):
            await queue.admit(pool.pick, limit=1, wait_s=1.2)
        waited: list[float] = []
        task = asyncio.create_task(queue.admit(pool.pick, limit=1, wait_s=5, on_wait=waited.append))
        await asyncio.sleep(0.1)
        pool.free = 1  # room appears with nobody calling wake (a placement was loaded): the poll finds it
        assert await task > 0
        assert len(waited) == 1 and 0.1 < waited[0] < 2.5

    asyncio.run(scenario())


def test_a_turn_its_waiter_cannot_use_goes_to_the_next() -> None:
    async def scenario() -> None:
        queue, pool = AdmissionQueue(), Pool(free=0)
        first = asyncio.create_task(queue.admit(pool.pick, limit=4, wait_s=10))
        second = asyncio.create_task(queue.admit(pool.pick, limit=4, wait_s=10))
        await asyncio.sleep(0.05)
        pool.stall = True  # the first one's pick hangs after it takes its turn
        pool.free = 1
        queue.wake()
        await asyncio.sleep(0.05)
        first.cancel()  # its client went away mid-pick
        await asyncio.gather(first, return_exceptions=True)
        pool.stall = False
        pool.block.set()
        assert await asyncio.wait_for(second, 0.5) > 0  # woken at once, not by its poll a second later

    asyncio.run(scenario())


def test_a_placement_that_goes_away_while_requests_wait_is_waited_for() -> None:
    async def scenario() -> None:
        queue, pool = AdmissionQueue(), Pool(free=0)
        waiting = asyncio.create_task(queue.admit(pool.pick, limit=2, wait_s=5))
        await asyncio.sleep(0.05)
        pool.gone = True  # the pipeline's stage failed: nothing serves for a moment
        queue.wake()
        await asyncio.sleep(0.1)
        assert not waiting.done() and len(queue) == 1
        pool.gone, pool.free = False, 1  # the controller repaired it
        queue.wake()
        assert await asyncio.wait_for(waiting, 1.0) > 0
        # nothing comes back: at the deadline the request hears that nothing serves (503), not "full"
        pool.free = 0
        late = asyncio.create_task(queue.admit(pool.pick, limit=2, wait_s=1.2))
        await asyncio.sleep(0.05)
        pool.gone = True
        with pytest.raises(Unavailable, match="no node serving"):
            await late
        # with nobody waiting, no placement is said at once
        with pytest.raises(Unavailable):
            await queue.admit(pool.pick, limit=2, wait_s=5)

    asyncio.run(scenario())
