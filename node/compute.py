"""The one OS thread on which a node runs every ggml and llama.cpp computation.

Why one thread: llama-cpp-python's ggml is built with OpenMP, and libgomp gives each
thread that starts a parallel region its own team of workers. Once a process holds more
of those workers than it has cores (a second team from the start-up probe on another
thread is enough), libgomp stops spinning at barriers and sleeps on a futex at every
one instead; a decode step crosses hundreds of barriers, and measured here it got 40%
slower. A single compute thread keeps a single team. It also matches how the engines
already work: one computation at a time, each using every core it is given.

Work comes in two kinds: a call (one function, its result in a future) and a stream
(an iterator advanced one item per turn). Turns go round in arrival order, so several
replica requests share the thread token by token and a pipeline step never waits for a
whole answer of another request.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from mesh.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# libgomp settings for pipeline stage processes. Stages of one machine take turns on each
# token, so a stage that has finished must hand the cores over at once: its OpenMP workers
# may spin only briefly (about 30 microseconds, enough to cover the wait at an op barrier
# inside a step) before they sleep. With no spin at all every barrier sleeps and a decode
# step took 35% longer; with libgomp's default of about 3 ms an idle stage's worker spins
# on the core the next stage needs (measured on 2 cores, 3 stages: 27.9 ms per token with no
# spin, 20.4 ms with 3000 spins, 23.5 ms with 30000).
STAGE_OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"}


@dataclass
class _Call(Generic[T]):
    fn: Callable[[], T]
    future: Future[T]


@dataclass
class _Stream(Generic[T]):
    items: Iterator[T]
    emit: Callable[[T], None]
    done: Future[None]


class ComputeThread:
    def __init__(self, name: str = "compute") -> None:
        self._jobs: deque[_Call[Any] | _Stream[Any]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run fn() on the compute thread after the turns already queued."""
        job: _Call[T] = _Call(fn, Future())
        self._push(job)
        return job.future

    def stream(self, items: Iterator[T], emit: Callable[[T], None]) -> Future[None]:
        """Advance `items` one item per turn, passing each to emit (on the compute thread).
        The future ends when the iterator does, with its exception if it raised."""
        job: _Stream[T] = _Stream(items, emit, Future())
        job.done.set_running_or_notify_cancel()  # a stream is ended by its iterator, never by cancel()
        self._push(job)
        return job.done

    def close(self) -> None:
        """Refuse the turns still queued (their callers get Unavailable), stop the thread and
        wait for the turn in progress to end."""
        with self._cond:
            self._closed = True
            pending = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in pending:
            self._refuse(job)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _push(self, job: _Call[Any] | _Stream[Any]) -> None:
        with self._cond:
            if not self._closed:
                self._jobs.append(job)
                self._cond.notify()
                return
        self._refuse(job)

    @staticmethod
    def _refuse(job: _Call[Any] | _Stream[Any]) -> None:
        error = Unavailable("the node's compute thread has stopped")
        if isinstance(job, _Call):
            job.future.set_exception(error)
        else:
            _close_items(job)
            job.done.set_exception(error)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
            if isinstance(job, _Call):
                self._turn_call(job)
            elif self._turn_stream(job):
                self._push(job)

    @staticmethod
    def _turn_call(job: _Call[Any]) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future
            job.future.set_exception(exc)

    @staticmethod
    def _turn_stream(job: _Stream[Any]) -> bool:
        """One item; True while the stream has more to give."""
        try:
            item = next(job.items)
        except StopIteration:
            job.done.set_result(None)
            return False
        except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the stream
            job.done.set_exception(exc)
            return False
        try:
            job.emit(item)
        except BaseException as exc:  # a consumer that cannot take items ends its stream
            log.exception("a compute stream's consumer failed")
            _close_items(job)
            job.done.set_exception(exc)
            return False
        return True


def _close_items(job: _Stream[Any]) -> None:
    """End a stream's iterator early; a generator's finally blocks (slot release) still run."""
    close = getattr(job.items, "close", None)
    if close is not None:
        close()
