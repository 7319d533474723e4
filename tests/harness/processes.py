"""Every process a test launches runs in its own session, and is ended by process group.

Why a group and not a pid: `edgemesh up` starts nodes, `ip netns exec` starts a node, a
node may start helpers; signalling only the direct child let those grandchildren outlive
the test (and then hold ports, CPU and model memory for the rest of the suite). With
start_new_session=True the child leads a new session and process group (pgid == pid),
so os.killpg reaches everything it started that did not leave the group itself.

Ending a group: SIGTERM (then SIGCONT, so a member a test left SIGSTOPped wakes up to act
on it), wait for the leader, then for the other members; SIGKILL whatever is still there
after the grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

POLL_S = 0.05


def popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """subprocess.Popen in a session of its own (so stop_group can end all it starts)."""
    kwargs.setdefault("start_new_session", True)
    return subprocess.Popen(argv, **kwargs)


def run(argv: list[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """subprocess.run in a session of its own: on a timeout the whole group is killed (plain
    subprocess.run kills only the child), and whatever the command left running in its group
    is ended once it exits."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    capture = kwargs.pop("capture_output", False)
    if capture:
        kwargs["stdout"] = subprocess.PIPE
        kwargs["stderr"] = subprocess.PIPE
    process = popen(argv, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(process, signal.SIGKILL, grace_s=5)
        process.communicate()
        raise
    finally:
        stop_group(process, grace_s=5)  # the leader is gone; its leftovers are not
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`. Zombies that are this process's
    children (orphans reparented to us as child subreaper, see guards.py) are reaped here."""
    members = []
    for row in proc_table():
        if row.pgrp != pgid:
            continue
        if row.state == "Z":
            if row.ppid == os.getpid() and row.pid != pgid:
                # An orphan handed to us; never the leader, whose Popen reaps it itself.
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(row.pid, os.WNOHANG)
            continue
        members.append(row.pid)
    return members


def stop_group(process: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace_s: float = 75.0) -> int | None:
    """End `process` and everything in its process group: `sig`, wait up to `grace_s` for
    all of them, then SIGKILL. Returns the leader's exit code. A process started without
    its own session is ended by pid alone (its group is ours)."""
    pgid = process.pid
    own_group = _pgid(pgid) == pgid if process.poll() is None else True
    if process.poll() is None or group_members(pgid):
        _signal(pgid, sig, own_group)
        if sig not in (signal.SIGKILL, signal.SIGCONT):
            _signal(pgid, signal.SIGCONT, own_group)
    deadline = time.monotonic() + grace_s
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _signal(pgid, signal.SIGKILL, own_group)
        process.wait()
    if own_group:
        while group_members(pgid):
            if time.monotonic() > deadline:
                _signal(pgid, signal.SIGKILL, True)
                deadline = time.monotonic() + 5  # SIGKILL is not refused; this is the kernel's time
            time.sleep(POLL_S)
    return process.returncode


def stop_groups(processes: list[subprocess.Popen[Any]], grace_s: float = 75.0) -> None:
    """SIGTERM every group at once (so their drains overlap), then end each as stop_group."""
    for process in processes:
        if process.poll() is None and _pgid(process.pid) == process.pid:
            _signal(process.pid, signal.SIGTERM, True)
            _signal(process.pid, signal.SIGCONT, True)
    deadline = time.monotonic() + grace_s
    for process in processes:
        stop_group(process, grace_s=max(0.1, deadline - time.monotonic()))


def _signal(pgid: int, sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pgid, sig)
        else:
            os.kill(pgid, sig)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@dataclass(frozen=True)
class ProcRow:
    """One process, as /proc/<pid>/stat tells it."""

    pid: int
    state: str  # "Z" for a zombie
    ppid: int
    pgrp: int
    session: int


def proc_table() -> list[ProcRow]:
    """Every process of the machine, from /proc (Linux)."""
    rows = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        rows.append(ProcRow(int(entry), fields[0], int(fields[1]), int(fields[2]), int(fields[3])))
    return rows
