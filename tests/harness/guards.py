"""Leak guards, in the python-zeroconf style: a test that leaves a thread, an asyncio task or a
child process behind fails (an error at its teardown naming what leaked).

How it tells a leak from something a fixture owns:
- before each test's setup, a snapshot of live threads, pending asyncio tasks (of every event
  loop: asyncio keeps one weak set of all tasks) and child processes;
- while a module-, class- or session-scoped fixture sets up, what appears is that fixture's
  (pytest_fixture_setup); it may live until every fixture of that scope has been torn down
  (a fixture may start processes through another one of its scope, as page_url does through
  module_launcher), and must be gone then, or the teardown of the test that ended the scope
  fails naming the fixture;
- after the test's teardown (its function-scoped fixtures ended too), whatever is new and
  owned by no live fixture has leaked. Threads and children still ending get a short grace
  period first.

Children: this process is made a child subreaper (Linux prctl), so a grandchild whose parent
died (a node of an `edgemesh up` that was SIGKILLed, a daemon that double-forked) is handed
to us rather than to init, and so is seen and reported instead of silently outliving the
suite. Leaked children are reported and then killed (by group when they lead one), so that
one leak does not cascade into the next tests.

Nothing is whitelisted by name: what existed before a test started (pytest's own threads,
xdist's execnet thread, those of fixtures set up earlier) is in the baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.harness.processes import group_members, proc_table

# How long a thread or child that is ending gets before it counts as leaked (the guards' own
# tests shorten it, as their leaks are deliberate).
GRACE_S = float(os.environ.get("EDGEMESH_LEAK_GRACE_S", "5"))
PR_SET_CHILD_SUBREAPER = 36
DISABLE_ENV = "EDGEMESH_NO_LEAK_GUARDS"  # set to 1 to run without the guards (diagnosis only)


@dataclass(frozen=True)
class Child:
    pid: int
    started: int  # clock ticks after boot: a pid reused later is another process
    # Not part of the identity: a forked child's command line changes when it execs (a shell's
    # background job is `sh -c ...` for a moment, then `sleep 61`), and it is the same process.
    command: str = field(compare=False)


@dataclass(frozen=True)
class Snapshot:
    threads: frozenset[threading.Thread]
    tasks: frozenset[asyncio.Task[Any]]
    children: frozenset[Child]

    def __sub__(self, other: Snapshot) -> Snapshot:
        return Snapshot(self.threads - other.threads, self.tasks - other.tasks, self.children - other.children)

    def __or__(self, other: Snapshot) -> Snapshot:
        return Snapshot(self.threads | other.threads, self.tasks | other.tasks, self.children | other.children)

    def __bool__(self) -> bool:
        return bool(self.threads or self.tasks or self.children)


EMPTY = Snapshot(frozenset(), frozenset(), frozenset())


def _pending_tasks() -> frozenset[asyncio.Task[Any]]:
    """Pending tasks of every event loop in this process (asyncio.all_tasks sees one loop) that
    is not running. The guards run between tests, when no loop of the test's own runs: a loop
    running then runs on a thread of its own (an in-process node's), whose tasks come and go
    with that thread's work, and the thread itself is guarded."""
    sets = [getattr(asyncio.tasks, name, None) for name in ("_all_tasks", "_scheduled_tasks", "_eager_tasks")]
    for _ in range(100):  # a weak set changes size when another thread's loop adds a task
        try:
            return frozenset(t for s in sets if s is not None for t in list(s)
                             if not t.done() and not t.get_loop().is_running())
        except RuntimeError:
            continue
    return frozenset()


def _child_pids() -> list[int]:
    """Pids of this process's children: each thread's /proc children list (cheap: it reads a
    file per thread of ours, not one per process of the machine), or a scan of /proc where
    the kernel has no such list."""
    try:
        pids = []
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                with open(f"/proc/self/task/{tid}/children") as f:
                    pids.extend(int(pid) for pid in f.read().split())
        return pids
    except OSError:
        return [row.pid for row in proc_table() if row.ppid == os.getpid()]


def _children_with_pid(pid: int) -> frozenset[Child]:
    return frozenset(c for c in _children() if c.pid == pid)


def _children() -> frozenset[Child]:
    """Live (not zombie) child processes of this process."""
    found = set()
    for pid in _child_pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                head, _, rest = f.read().rpartition(")")
            fields = rest.split()
            if fields[0] == "Z":
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            continue  # ended while we looked
        found.add(Child(pid, int(fields[19]), command or head.partition("(")[2]))
    return frozenset(found)


def _process_wide(thread: threading.Thread) -> bool:
    """grpc.aio's completion-queue poller: one per process, started by the first aio channel or
    server and ended by grpc only once every aio object of the process has been collected
    (which a traceback held by pytest can delay past any test). Its life is grpc's, not a test's."""
    target = getattr(thread, "_target", None)
    return getattr(target, "__qualname__", "") == "PollerCompletionQueue._poll_wrapper"


def snapshot() -> Snapshot:
    threads = frozenset(t for t in threading.enumerate() if t.is_alive() and not _process_wide(t))
    return Snapshot(threads, _pending_tasks(), _children() if sys.platform == "linux" else frozenset())


def _still_running(leaked: Snapshot, grace_s: float) -> Snapshot:
    """What of `leaked` is still there after letting it end for up to grace_s seconds."""
    deadline = time.monotonic() + grace_s
    # Some threads end when an object that owns them is freed: grpc.aio's poller thread lives
    # while any aio channel or server does, and one in a reference cycle waits for the gc.
    gc.collect()
    for thread in leaked.threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    while True:
        now = snapshot()
        left = Snapshot(leaked.threads & now.threads, leaked.tasks & now.tasks, leaked.children & now.children)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _describe(leaked: Snapshot) -> str:
    lines = []
    for thread in sorted(leaked.threads, key=lambda t: t.name):
        target = getattr(thread, "_target", None)
        where = getattr(target, "__qualname__", None) or type(thread).__qualname__
        lines.append(f"  thread {thread.name!r} (daemon={thread.daemon}) running {where}")
    for task in sorted(leaked.tasks, key=lambda t: t.get_name()):
        lines.append(f"  asyncio task {task.get_name()!r}: {task.get_coro()!r}")
    for child in sorted(leaked.children, key=lambda c: c.pid):
        lines.append(f"  child process {child.pid}: {child.command[:200]}")
    return "\n".join(lines)


def _end_children(children: frozenset[Child]) -> None:
    """SIGKILL leaked children (their whole group when they lead one) and reap them."""
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(child.pid) == child.pid:
                os.killpg(child.pid, signal.SIGKILL)
            else:
                os.kill(child.pid, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child.pid, 0)
        group_members(child.pid)  # reaps the group's orphans handed to us


class LeakGuard:
    """The plugin object: registered by tests/conftest.py."""

    def __init__(self) -> None:
        self.baseline = EMPTY
        self.owned: dict[Any, Snapshot] = {}  # FixtureDef -> what appeared while it set up
        # What a fixture left when it was finalized, by the node of its scope (module, class,
        # session): a fixture may start processes through another of the same scope (page_url
        # through module_launcher), so the check waits until every fixture of that scope ended.
        self.ending: dict[pytest.Item | pytest.Collector, list[tuple[str, Snapshot]]] = {}
        self.setting_up: list[Any] = []  # the broader-scope fixtures now being set up, innermost last

    def _owned_by_live_fixtures(self) -> Snapshot:
        owned = EMPTY
        for things in self.owned.values():
            owned = owned | things
        for left in self.ending.values():
            for _, things in left:
                owned = owned | things
        return owned

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: Any, request: pytest.FixtureRequest) -> Generator[None, Any, Any]:
        if fixturedef.scope == "function":
            return (yield)
        before = snapshot()
        self.setting_up.append(fixturedef)
        try:
            return (yield)
        finally:
            self.setting_up.remove(fixturedef)
            self.owned[fixturedef] = self.owned.get(fixturedef, EMPTY) | (snapshot() - before)

    def adopt(self, owner: Any, pid: int) -> None:
        """A child started for `owner` (a fixture still set up) while a test runs is `owner`'s."""
        if owner in self.owned:
            self.owned[owner] = self.owned[owner] | Snapshot(frozenset(), frozenset(), _children_with_pid(pid))

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_post_finalizer(self, fixturedef: Any,
                                      request: pytest.FixtureRequest) -> Generator[None, Any, Any]:
        result = yield
        things = self.owned.pop(fixturedef, EMPTY)
        if things:
            now = snapshot()
            left = Snapshot(things.threads & now.threads, things.tasks & now.tasks, things.children & now.children)
            if left:
                self.ending.setdefault(request.node, []).append((f"{fixturedef.scope}-scoped fixture "
                                                                 f"{fixturedef.argname!r}", left))
        return result

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, Any, Any]:
        self.baseline = snapshot()
        return (yield)

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, Any, Any]:
        result = yield  # every function-scoped fixture (and any scope nextitem does not need) has ended
        problems = []
        owned = self._owned_by_live_fixtures()
        new = snapshot() - self.baseline - owned
        # A thread started by a fixture's own thread (an in-process node's loop opening its
        # executor or a stage's I/O pool while serving a test's call) is that fixture's too.
        new = Snapshot(frozenset(t for t in new.threads if not _started_by(t, owned.threads)), new.tasks,
                       new.children)
        if new:
            left = _still_running(new, GRACE_S)
            if left:
                _end_children(left.children)
                problems.append(f"{item.nodeid} leaked (still running {GRACE_S:.0f}s after its teardown):\n"
                                f"{_describe(left)}")
        # Scopes nextitem is not in have been torn down whole: their fixtures' leftovers are leaks now.
        still_set_up = set(nextitem.listchain()) if nextitem is not None else set()
        for node in [node for node in self.ending if node not in still_set_up]:
            for owner, things in self.ending.pop(node):
                left = _still_running(things, GRACE_S)
                if left:
                    _end_children(left.children)
                    problems.append(f"{owner} left running after its scope's teardown:\n{_describe(left)}")
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)
        return result


def become_subreaper() -> bool:
    """Orphaned descendants are handed to this process, not to init (Linux only)."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


_PARENT = "_edgemesh_started_by"


def _record_parents() -> None:
    """Every thread remembers the thread that started it (see _started_by)."""
    start = threading.Thread.start
    if getattr(start, "_records_parent", False):
        return

    def start_recording_parent(self: threading.Thread) -> None:
        setattr(self, _PARENT, threading.current_thread())
        start(self)

    start_recording_parent._records_parent = True  # type: ignore[attr-defined]
    threading.Thread.start = start_recording_parent  # type: ignore[method-assign]


def _started_by(thread: threading.Thread, owners: frozenset[threading.Thread]) -> bool:
    parent = getattr(thread, _PARENT, None)
    for _ in range(64):  # a chain of starts, not a cycle; bounded all the same
        if parent is None:
            return False
        if parent in owners:
            return True
        parent = getattr(parent, _PARENT, None)
    return False


_GUARD: LeakGuard | None = None


def current_owner() -> Any:
    """The module-, class- or session-scoped fixture being set up now, or None (in a test).
    A launcher made by such a fixture keeps this, and hands what it starts later to it (see
    adopt): a class's network whose tests start nodes one by one owns those nodes."""
    return _GUARD.setting_up[-1] if _GUARD is not None and _GUARD.setting_up else None


def adopt(owner: Any, pid: int) -> None:
    if _GUARD is not None and owner is not None:
        _GUARD.adopt(owner, pid)


def register(config: pytest.Config) -> None:
    global _GUARD
    if os.environ.get(DISABLE_ENV) == "1":
        return
    become_subreaper()
    _record_parents()
    _GUARD = LeakGuard()
    config.pluginmanager.register(_GUARD, "edgemesh-leak-guard")
