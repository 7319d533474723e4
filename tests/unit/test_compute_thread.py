"""node.compute.ComputeThread: every computation of a node on one OS thread, in fair turns."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial

import pytest

from mesh.errors import Unavailable
from node.compute import ComputeThread


def _hold(compute: ComputeThread) -> threading.Event:
    """Keep the compute thread busy until the returned event is set, so that the work
    queued meanwhile is ordered only by the thread's turns."""
    release = threading.Event()
    started = threading.Event()

    def block() -> None:
        started.set()
        release.wait(10)

    compute.call(block)
    assert started.wait(10)
    return release


def test_calls_run_in_order_on_one_thread() -> None:
    compute = ComputeThread()
    try:
        def where(i: int) -> tuple[int, int]:
            return i, threading.get_ident()

        futures = [compute.call(partial(where, i)) for i in range(20)]
        results = [f.result(10) for f in futures]
        assert [i for i, _ in results] == list(range(20))
        assert len({ident for _, ident in results}) == 1
        assert results[0][1] != threading.get_ident()
    finally:
        compute.close()


def test_a_failing_call_reports_its_error_and_the_thread_goes_on() -> None:
    compute = ComputeThread()
    try:
        def fail() -> None:
            raise ValueError("bad step")

        with pytest.raises(ValueError, match="bad step"):
            compute.call(fail).result(10)
        assert compute.call(lambda: 42).result(10) == 42
    finally:
        compute.close()


def test_streams_and_calls_take_turns() -> None:
    compute = ComputeThread()
    order: list[str] = []
    try:
        release = _hold(compute)
        a = compute.stream(iter(["a1", "a2", "a3"]), order.append)
        b = compute.stream(iter(["b1", "b2"]), order.append)
        c = compute.call(lambda: order.append("call"))
        release.set()
        for f in (a, b, c):
            f.result(10)
        # one item per turn, in arrival order: a call queued behind two streams waits for
        # one item of each, not for the whole streams
        assert order == ["a1", "b1", "call", "a2", "b2", "a3"]
    finally:
        compute.close()


def test_a_stream_that_raises_ends_with_its_error() -> None:
    compute = ComputeThread()
    seen: list[int] = []

    def items() -> Iterator[int]:
        yield 1
        raise RuntimeError("engine failed")

    try:
        done = compute.stream(items(), seen.append)
        with pytest.raises(RuntimeError, match="engine failed"):
            done.result(10)
        assert seen == [1]
    finally:
        compute.close()


def test_close_refuses_queued_work_and_closes_generators() -> None:
    compute = ComputeThread()
    cleaned = threading.Event()

    def items() -> Iterator[int]:
        try:
            yield 1
            yield 2
        finally:
            cleaned.set()  # e.g. a replica slot going back to the pool

    first = _hold(compute)
    stream = compute.stream(items(), lambda _item: None)
    second_started, second = threading.Event(), threading.Event()
    def hold_again() -> None:
        second_started.set()
        second.wait(10)

    compute.call(hold_again)
    queued_call = compute.call(lambda: 1)
    first.set()  # the stream takes one turn, then the second hold starts
    assert second_started.wait(10)
    closer = threading.Thread(target=compute.close)
    closer.start()
    closer.join(0.2)
    second.set()
    closer.join(10)
    assert not closer.is_alive()
    for future in (queued_call, stream):
        with pytest.raises(Unavailable):
            future.result(10)
    assert cleaned.is_set()
    with pytest.raises(Unavailable):
        compute.call(lambda: 1).result(10)
