"""Fuzz every surface of a live mesh: a node's gRPC methods, its step socket, the gateway's
HTTP API, and the GGUF header readers (see tests/fuzz_cases.py for the cases and what
counts as a pass).

Starts, on loopback with a fresh cluster key: a node that only the fuzzer talks to (the
gRPC and step-socket cases), a gateway with a node of its own (the HTTP cases), all on a
tiny GGUF model with a chat template, so that a case that is valid runs the real engines
in milliseconds. Prints, per surface: cases run, failures with their reproducers, the
slowest case, the outcomes seen and the resident memory (VmRSS) of each process before,
at its peak and after.

    .venv/bin/python benchmarks/fuzz.py [--cases 10000] [--seed 1] [--surface grpc --surface http ...]
                                        [--minutes 15]           # a time budget shared by the surfaces
    .venv/bin/python benchmarks/fuzz.py --surface grpc --seed 1 --case 1234   # replay one case, verbosely

Exit status 1 when any surface had a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from tests import fuzz_cases as fz
from tests.conftest import Launcher

SAMPLE_EVERY = 100  # cases between two samples of each process's resident memory
RESTORE_EVERY = 25  # gRPC cases between two restorations of the node's holdings
SETTLE_S = 10.0  # how long thread counts get to come back down after a surface's cases


class Memory:
    """VmRSS of named processes: at the start, the highest sample and at the end."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before = {name: fz.rss_bytes(pid) for name, pid in pids.items()}
        self.peak = dict(self.before)

    def sample(self) -> None:
        for name, pid in self.pids.items():
            self.peak[name] = max(self.peak[name], fz.rss_bytes(pid))

    def finish(self, report: fz.SurfaceReport) -> None:
        self.sample()
        for name, pid in self.pids.items():
            report.memory[name] = (self.before[name], self.peak[name], fz.rss_bytes(pid))


def fuzz_grpc(mesh: fz.FuzzMesh, report: fz.SurfaceReport, indices: range | list[int], until: float,
              verbose: bool = False) -> None:
    target = mesh.target
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # the channel binds to the loop current when it is made
    fuzzer = fz.GrpcFuzzer(target)
    memory = Memory({"node": mesh.node.pid})
    threads_before = fz.thread_count(mesh.node.pid)

    def before(index: int) -> None:
        if index % RESTORE_EVERY == 0 or verbose:
            try:
                loop.run_until_complete(fz.restore_node(target))
            except Exception as exc:  # noqa: BLE001 - a node that cannot be put back is a finding
                report.failures.append((index, fz.Verdict("restoring the node before this case",
                                                          f"{type(exc).__name__}: {exc}", "restore")))
        if index % SAMPLE_EVERY == 0:
            memory.sample()

    def run(index: int, rng: random.Random) -> fz.Verdict:
        case = fz.make_grpc_case(rng, target)
        return loop.run_until_complete(fuzzer.run(case, rng))

    try:
        fz.run_cases(report, indices, run, before=before, on_case=_printer(verbose), until=until)
        problem = loop.run_until_complete(fz.node_still_serves(target))
        if problem:
            report.failures.append((-1, fz.Verdict("a normal Info and Generate after the run", problem, "after")))
        settle_threads(report, "node", mesh.node.pid, threads_before)
        memory.finish(report)
    finally:
        loop.run_until_complete(fuzzer.close())
        loop.close()
        asyncio.set_event_loop(None)


def fuzz_step(mesh: fz.FuzzMesh, report: fz.SurfaceReport, indices: range | list[int], until: float,
              verbose: bool = False) -> None:
    target = mesh.target
    pid = mesh.node.pid
    asyncio.run(fz.restore_node(target))
    memory = Memory({"node": pid})
    threads_before = fz.thread_count(pid)

    def before(index: int) -> None:
        if index % SAMPLE_EVERY == 0:
            memory.sample()

    def run(index: int, rng: random.Random) -> fz.Verdict:
        return fz.run_step_case(fz.make_step_case(rng, target), target)

    fz.run_cases(report, indices, run, before=before, on_case=_printer(verbose), until=until)
    settle_threads(report, "node", pid, threads_before)
    problem = asyncio.run(fz.node_still_serves(target))
    if problem:
        report.failures.append((-1, fz.Verdict("a normal Info and Generate after the run", problem, "after")))
    memory.finish(report)


def settle_threads(report: fz.SurfaceReport, name: str, pid: int, before: int) -> None:
    """Threads of a process back to (about) where they were: connection threads end with
    their connections, so anything left after SETTLE_S is a leak."""
    deadline = time.monotonic() + SETTLE_S
    now = fz.thread_count(pid)
    while now > before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        now = fz.thread_count(pid)
    report.threads[name] = (before, now)
    if now > before + 2:
        report.failures.append((-1, fz.Verdict(f"threads of the {name} after {SETTLE_S:.0f}s",
                                               f"{before} threads before the run, {now} after", "threads")))


def fuzz_http(mesh: fz.FuzzMesh, report: fz.SurfaceReport, indices: range | list[int], until: float,
              verbose: bool = False) -> None:
    assert mesh.gateway is not None and mesh.backend is not None
    url = mesh.gateway_url
    memory = Memory({"gateway": mesh.gateway.pid, "backend node": mesh.backend.pid})
    threads_before = fz.thread_count(mesh.gateway.pid)
    with httpx.Client() as client:
        def before(index: int) -> None:
            if index % SAMPLE_EVERY == 0:
                memory.sample()

        def run(index: int, rng: random.Random) -> fz.Verdict:
            return fz.run_http_case(client, url, fz.make_http_case(rng))

        fz.run_cases(report, indices, run, before=before, on_case=_printer(verbose), until=until)
    problem = fz.gateway_still_serves(url)
    if problem:
        report.failures.append((-1, fz.Verdict("a normal chat and completion after the run", problem, "after")))
    settle_threads(report, "gateway", mesh.gateway.pid, threads_before)
    memory.finish(report)


def fuzz_gguf(mesh: fz.FuzzMesh, report: fz.SurfaceReport, indices: range | list[int], until: float,
              verbose: bool = False) -> None:
    import os

    fixture = fz.gguf_fixture(mesh.model)
    work = fz.gguf_workdir(mesh.launcher.workdir)
    memory = Memory({"this process": os.getpid()})

    def before(index: int) -> None:
        if index % SAMPLE_EVERY == 0:
            memory.sample()

    def run(index: int, rng: random.Random) -> fz.Verdict:
        return fz.run_gguf_case(fz.make_gguf_case(rng, fixture), work, index)

    with fz.allocation_tracing():
        fz.run_cases(report, indices, run, before=before, on_case=_printer(verbose), until=until)
    memory.finish(report)


SURFACE_RUNNERS: dict[str, Callable[..., None]] = {
    "grpc": fuzz_grpc, "step": fuzz_step, "http": fuzz_http, "gguf": fuzz_gguf}


def _printer(verbose: bool) -> Callable[[int, fz.Verdict, float], None] | None:
    if not verbose:
        return None

    def show(index: int, verdict: fz.Verdict, seconds: float) -> None:
        print(f"case {index}: {seconds * 1000:.1f} ms, {verdict.outcome}\n  {verdict.description}")
        print(f"  FAILED: {verdict.problem}" if verdict.problem else "  passed")

    return show


def print_report(report: fz.SurfaceReport, elapsed: float) -> None:
    rate = report.cases / elapsed if elapsed else 0.0
    print(f"\n== {report.surface}: {report.cases} cases in {elapsed:.0f} s ({rate:.0f} cases/s), "
          f"{len(report.failures)} failure(s), seed {report.seed}")
    seconds, index, what = report.slowest
    print(f"   slowest: case {index}, {seconds * 1000:.0f} ms: {fz.short(what, 200)}")
    tallies = ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items(), key=lambda kv: -kv[1])[:12])
    print(f"   outcomes: {tallies}")
    for name, (before, peak, after) in report.memory.items():
        print(f"   {name} RSS: {before / 2**20:.1f} MB before, {peak / 2**20:.1f} MB peak, {after / 2**20:.1f} MB "
              f"after ({(after - before) / 2**20:+.1f} MB)")
    for name, (before, after) in report.threads.items():
        print(f"   {name} threads: {before} before, {after} after")
    for note in report.notes:
        print(f"   note: {note}")
    groups: dict[str, list[tuple[int, fz.Verdict]]] = {}
    for index, verdict in report.failures:
        groups.setdefault(problem_kind(verdict.problem), []).append((index, verdict))
    for kind, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"   FAILED x{len(members)}: {kind}")
        for index, verdict in members[:3]:
            where = report.reproducer(index) if index >= 0 else "after the run"
            print(f"     {where}\n        {fz.short(verdict.problem, 300)}\n"
                  f"        case: {fz.short(verdict.description, 400)}")


def tracebacks(name: str, log_text: str) -> list[str]:
    """The exceptions a process logged with a traceback (what escaped a handler), by kind."""
    kinds: dict[str, int] = {}
    lines = log_text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            last = next((x for x in lines[index + 1:] if x and not x.startswith((" ", "Traceback"))), "?")
            kinds[problem_kind(last)] = kinds.get(problem_kind(last), 0) + 1
    return [f"{name} logged {n} traceback(s) ending {kind!r}" for kind, n in kinds.items()]


def problem_kind(problem: str) -> str:
    """Failures grouped by what went wrong, not by their numbers or names: one line per kind."""
    words = re.sub(r"'edgemesh\.v1\.\w+'", "'<message>'", problem)
    return re.sub(r"[0-9]+", "N", words)[:120]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000, help="cases per surface [default: 10000]")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--surface", action="append", choices=fz.SURFACES, help="repeatable [default: all]")
    parser.add_argument("--case", type=int, default=None, help="replay this one case of each --surface, verbosely")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="time budget for the whole run, shared equally by the surfaces (0 = none)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    surfaces = args.surface or list(fz.SURFACES)
    indices: range | list[int] = [args.case] if args.case is not None else range(args.cases)
    with tempfile.TemporaryDirectory(prefix="edgemesh-fuzz-") as tmp:
        workdir = Path(tmp)
        launcher = Launcher(workdir)
        started = time.monotonic()
        mesh = fz.start_mesh(launcher, fz.write_chat_model(workdir / "model"), with_gateway="http" in surfaces)
        print(f"mesh up in {time.monotonic() - started:.1f} s (logs in {workdir} while it runs)")
        failed = False
        try:
            share = args.minutes * 60 / len(surfaces) if args.minutes else 0.0
            for surface in surfaces:
                report = fz.SurfaceReport(surface, args.seed)
                began = time.monotonic()
                until = began + share if share else float("inf")
                logs = {proc.name: len(proc.log()) for proc in launcher.procs}
                SURFACE_RUNNERS[surface](mesh, report, indices, until, verbose=args.case is not None)
                for proc in launcher.procs:
                    report.notes.extend(tracebacks(proc.name, proc.log()[logs[proc.name]:]))
                print_report(report, time.monotonic() - began)
                failed = failed or bool(report.failures)
        finally:
            mesh.close()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
