"""The gateway's admission queue: requests that find every placement full wait their turn.

A replica queues on its node (`--max-queue`, counted in its capacity), but a pipeline's
stages hold one session per slot and queue nothing, so without this a pipeline given more
requests than slots refused the rest with 429 at once. Here such a request waits, first come
first served, until a placement frees a session; the queue is bounded by what the
pipelines' heads were started to queue (their `--max-queue`), and a wait is bounded by the
first-token deadline, so a client learns where it stands.

A request leaves the queue when it is woken (a stream ended: `wake`), when it polls and
finds room (a placement appeared), or when it gives up; a woken request that cannot use
its turn (it was cancelled, or someone else took the room) hands the turn to the next.
While it waits, a placement that goes away (a stage failed and the controller repairs the
pipeline) is waited for like a full one; at the deadline the request gets the last reason.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mesh.errors import CapacityExhausted, Unavailable

T = TypeVar("T")

POLL_S = 1.0  # a waiter looks again this often even unwoken (capacity can come from a new placement)


class _Waiter:
    def __init__(self) -> None:
        self.turn = asyncio.Event()


class AdmissionQueue:
    def __init__(self) -> None:
        self._waiting: deque[_Waiter] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def wake(self) -> None:
        """A session ended somewhere: the longest waiter that is not yet woken may try."""
        for waiter in self._waiting:
            if not waiter.turn.is_set():
                waiter.turn.set()
                return

    async def admit(self, pick: Callable[[], Awaitable[T]], limit: int, wait_s: float,
                    on_wait: Callable[[float], None] = lambda _s: None) -> T:
        """`pick()` now if nobody waits, else (or when it finds everything full) wait in line.

        `limit`: how many may wait (0: refuse at once, as before there was a queue);
        `wait_s`: how long one may wait; `on_wait(seconds)` is told how long a request that
        waited did wait."""
        if not self._waiting:
            try:
                return await pick()
            except CapacityExhausted:
                if limit <= 0:
                    raise
        if len(self._waiting) >= limit:
            raise CapacityExhausted(f"every placement is at capacity and {len(self._waiting)} request(s) "
                                    "already wait in the queue; retry shortly")
        waiter = _Waiter()
        self._waiting.append(waiter)
        started = time.monotonic()
        trying = False  # between taking a turn and using it
        gone: Unavailable | None = None  # the last pick found no placement at all
        try:
            while True:
                left = wait_s - (time.monotonic() - started)
                if left <= 0:
                    if gone is not None:
                        raise gone
                    raise CapacityExhausted(f"every placement stayed at capacity for the {wait_s:.0f} s this "
                                            "request waited in the queue; retry later")
                try:
                    await asyncio.wait_for(waiter.turn.wait(), min(POLL_S, left))
                except TimeoutError:
                    if self._waiting[0] is not waiter:
                        continue  # unwoken and not first: those ahead look first
                waiter.turn.clear()
                trying = True
                try:
                    chosen = await pick()
                except (CapacityExhausted, Unavailable) as exc:
                    # someone else took the room, or the placement is being replaced: keep the place in line
                    trying = False
                    gone = exc if isinstance(exc, Unavailable) else None
                    continue
                trying = False
                self._waiting.remove(waiter)
                on_wait(time.monotonic() - started)
                return chosen
        finally:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
                if waiter.turn.is_set() or trying:
                    self.wake()  # a turn this request could not use goes to the next
