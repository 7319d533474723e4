"""llama.cpp's own distributed mode (its RPC backend) on the links EdgeMesh's pipelines run on.

The reference EdgeMesh's pipeline is compared with: `ggml-rpc-server` processes on some hosts
and `llama-bench --rpc host:port,...` on a head host, with the model's layers spread so that N
devices each hold ~1/N of them, as an N-stage EdgeMesh pipeline does. Also llama.cpp in ONE
process (llama-bench without --rpc), the same model and threads, so a caller has both.

How llama.cpp places layers (src/llama-model.cpp, load_tensors, in the vendored llama.cpp):
the RPC servers are its "GPU" devices (listed before any local GPU; the local CPU is never one
of them). The token embedding always stays on the head's CPU. Of the n_layer repeating layers
plus the output head (n_layer + 1 units), the LAST `-ngl` units are offloaded and the rest run
on the head's CPU; the offloaded units are cut among the devices by the cumulative proportions
of `--tensor-split`. So:
  head_holds_layers=True   the head's CPU is one of the N devices (like EdgeMesh's stage 0, which
                           runs its layers in the head's process): N-1 RPC servers, the head keeps
                           the first round(n_layer/N) layers, -ngl offloads the rest + output.
  head_holds_layers=False  N RPC servers hold every layer (-ngl n_layer+1); the head's CPU only
                           looks up embeddings and drives the graph.
The output head goes with the last device in both, as EdgeMesh's last stage samples.
The distributed processes get the libgomp settings of EdgeMesh's stage processes (see
`distributed`); the one-process run keeps libgomp's defaults, as llama.cpp alone would.

Hosts: `Loopback()` (processes on 127.0.0.1) or `NetnsHost(net, i)`, a host of a
tests/system/netns.py TestNet (processes started with `net.popen(i, ...)` and bound to the
host's address). With a link profile name (tests/harness/link_profiles.py) every host's link is
shaped with `net.shape(i, PROFILES[name])` first.

    python -m benchmarks.llama_rpc --build                # build once (minutes), then cached
    python -m benchmarks.llama_rpc --devices 2,3          # loopback: 1 process, 2 and 3 devices
    python -m benchmarks.llama_rpc --net netns --profile wifi --devices 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchmarks.llama_build import Binaries, cached, ensure_built
from mesh.errors import EdgeMeshError
from node.compute import STAGE_OPENMP_ENV
from tests.harness import processes

log = logging.getLogger("llama_rpc")

START_TIMEOUT_S = 30.0
BENCH_TIMEOUT_S = 900.0
STOP_GRACE_S = 5.0  # the servers hold no state worth a drain
PORT_TRIES = 5


class LlamaRpcError(EdgeMeshError):
    """A llama.cpp RPC run could not be set up or did not produce results."""


# ---------------------------------------------------------------------------------- hosts


class Host(Protocol):
    @property
    def address(self) -> str: ...

    @property
    def label(self) -> str: ...

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]: ...

    def free_port(self) -> int: ...


@dataclass(frozen=True)
class Loopback:
    """This machine's loopback: processes in their own session (tests/harness/processes.py)."""

    address: str = "127.0.0.1"

    @property
    def label(self) -> str:
        return "loopback"

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return processes.popen(argv, **kwargs)

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind((self.address, 0))
            return int(s.getsockname()[1])


@dataclass(frozen=True)
class NetnsHost:
    """Host `index` of a TestNet; the network tracks (and on close ends) what is started here."""

    net: Any  # tests.system.netns.TestNet (not imported at module level: it needs root to use)
    index: int

    @property
    def address(self) -> str:
        return str(self.net.hosts[self.index].address)

    @property
    def label(self) -> str:
        return f"netns host {self.index}"

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process: subprocess.Popen[bytes] = self.net.popen(self.index, argv, **kwargs)
        return process

    def free_port(self) -> int:
        # A fresh namespace has nothing bound but what we started; a clash only costs a retry.
        return 20000 + secrets.randbelow(40000)


# -------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class BenchRun:
    """One llama-bench test (pp<N> or tg<N>): its mean rate and every repetition's."""

    test: str  # "pp512", "tg128"
    n_prompt: int
    n_gen: int
    tok_s: float
    stddev_tok_s: float
    samples_tok_s: tuple[float, ...]


@dataclass(frozen=True)
class LlamaResult:
    n_devices: int  # devices that hold layers (the head's CPU counts when it holds some)
    rpc_servers: int
    head_layers: int  # repeating layers on the head's CPU
    decode_tok_s: float
    prefill_tok_s: float
    n_prompt: int
    n_gen: int
    threads: int
    hosts: str  # "loopback", "netns", "netns+wifi"
    runs: tuple[BenchRun, ...]
    argv: tuple[str, ...] = field(default=())  # the llama-bench command line
    pids: tuple[int, ...] = field(default=())  # every process the run started (all ended when it returns)

    @property
    def decode_best_tok_s(self) -> float:
        """The fastest decode repetition: on a shared CPU, the closest to the uncontended speed."""
        return max((x for r in self.runs if r.n_prompt == 0 for x in r.samples_tok_s), default=self.decode_tok_s)

    @property
    def prefill_best_tok_s(self) -> float:
        return max((x for r in self.runs if r.n_gen == 0 for x in r.samples_tok_s), default=self.prefill_tok_s)

    @property
    def ttft_s(self) -> float:
        """Time to first token estimate: the prompt's prefill at the measured rate."""
        return self.n_prompt / self.prefill_tok_s if self.prefill_tok_s > 0 else float("inf")


@dataclass(frozen=True)
class LayerSplit:
    head_layers: int
    n_gpu_layers: int  # llama.cpp's -ngl: the last units (layers + output head) offloaded
    tensor_split: tuple[int, ...]  # units per RPC device, in --rpc order


def layer_split(n_layers: int, n_devices: int, head_holds_layers: bool) -> LayerSplit:
    """llama.cpp's -ngl and --tensor-split for N devices holding ~1/N of the layers each."""
    if n_devices < 1 or n_layers < n_devices:
        raise LlamaRpcError(f"cannot spread {n_layers} layers over {n_devices} devices")
    head = round(n_layers / n_devices) if head_holds_layers else 0
    remote = n_devices - 1 if head_holds_layers else n_devices
    rest = n_layers - head
    counts = [rest // remote + (1 if j < rest % remote else 0) for j in range(remote)] if remote else []
    if counts:
        counts[-1] += 1  # the output head: the (n_layers + 1)-th unit, always the last one offloaded
    return LayerSplit(head, n_layers + 1 - head if remote else 0, tuple(counts))


def model_layers(model: Path) -> int:
    from node.gguf import inspect

    return inspect(model).n_layers


# ------------------------------------------------------------------------------ processes


@dataclass
class _Server:
    host: Host
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"{self.host.address}:{self.port}"


def _tail(path: Path, n: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


def _wait_listening(server: _Server, timeout_s: float) -> bool:
    """True once the server accepts a TCP connection; False if it exited first (port taken)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        # The server's start-up lines sit in a full stdout buffer until its first client, so
        # readiness is a connection: the server takes it, reads no hello, and waits for the next.
        with contextlib.suppress(OSError), socket.create_connection((server.host.address, server.port), timeout=1.0):
            return True
        time.sleep(0.1)
    raise LlamaRpcError(f"rpc-server on {server.host.label} did not listen on {server.endpoint} within "
                        f"{timeout_s:.0f} s:\n{_tail(server.log_path)}")


def _start_server(binaries: Binaries, host: Host, threads: int, workdir: Path, pids: list[int],
                  env: Mapping[str, str]) -> _Server:
    for attempt in range(PORT_TRIES):
        port = host.free_port()
        log_path = workdir / f"rpc-{host.address}-{port}.log"
        with open(log_path, "wb") as out:
            process = host.popen([str(binaries.rpc_server), "-H", host.address, "-p", str(port), "-t", str(threads)],
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **env})
        pids.append(process.pid)
        server = _Server(host, port, process, log_path)
        try:
            if _wait_listening(server, START_TIMEOUT_S):
                log.info("rpc-server on %s listening at %s (pid %d)", host.label, server.endpoint, process.pid)
                return server
        except BaseException:
            processes.stop_group(process, grace_s=STOP_GRACE_S)
            raise
        processes.stop_group(process, grace_s=STOP_GRACE_S)
        log.info("rpc-server could not take port %d on %s (attempt %d): %s", port, host.label, attempt + 1,
                 _tail(log_path, 3))
    raise LlamaRpcError(f"rpc-server on {host.label} found no free port in {PORT_TRIES} tries")


@contextlib.contextmanager
def rpc_servers(binaries: Binaries, hosts: Sequence[Host], threads: int, workdir: Path,
                pids: list[int] | None = None, env: Mapping[str, str] = STAGE_OPENMP_ENV) -> Iterator[list[str]]:
    """One rpc-server per host (a host may be listed twice: two servers on it); yields their
    host:port endpoints in order. Every server is ended by its process group on the way out;
    the pids of all started (also of tries on a taken port) are appended to `pids`."""
    started: list[_Server] = []
    try:
        for host in hosts:
            started.append(_start_server(binaries, host, threads, workdir, pids if pids is not None else [], env))
        yield [s.endpoint for s in started]
    finally:
        for server in started:
            processes.stop_group(server.process, grace_s=STOP_GRACE_S)


def bench_argv(binaries: Binaries, model: Path, *, threads: int, n_prompt: int, n_gen: int, reps: int,
               endpoints: Sequence[str] = (), split: LayerSplit | None = None) -> list[str]:
    argv = [str(binaries.llama_bench), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
            "-r", str(reps), "-o", "json"]
    if endpoints:
        assert split is not None
        argv += ["--rpc", ",".join(endpoints), "-ngl", str(split.n_gpu_layers)]
        if len(split.tensor_split) > 1:
            argv += ["-ts", "/".join(str(c) for c in split.tensor_split)]
    else:
        argv += ["-ngl", "0"]  # no devices; said anyway so the command line is explicit
    return argv


def _run_bench(head: Host, argv: list[str], timeout_s: float, pids: list[int],
               env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    log.info("running on %s: %s", head.label, " ".join(argv))
    process = head.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         env={**os.environ, **(env or {})})
    pids.append(process.pid)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise LlamaRpcError(f"llama-bench did not finish within {timeout_s:.0f} s") from None
    finally:
        processes.stop_group(process, grace_s=STOP_GRACE_S)
    if process.returncode != 0:
        err = stderr.decode(errors="replace").strip().splitlines()[-15:]
        raise LlamaRpcError(f"llama-bench failed ({process.returncode}):\n" + "\n".join(err))
    try:
        rows = json.loads(stdout)
    except json.JSONDecodeError as exc:
        raise LlamaRpcError(f"llama-bench printed no JSON ({exc}): {stdout[:500]!r}") from None
    if not isinstance(rows, list) or not rows:
        raise LlamaRpcError(f"llama-bench printed no results: {stdout[:500]!r}")
    return rows


def _runs(rows: list[dict[str, Any]]) -> tuple[BenchRun, ...]:
    out = []
    for row in rows:
        n_prompt, n_gen = int(row["n_prompt"]), int(row["n_gen"])
        test = f"pp{n_prompt}" if n_gen == 0 else f"tg{n_gen}" if n_prompt == 0 else f"pp{n_prompt}+tg{n_gen}"
        out.append(BenchRun(test, n_prompt, n_gen, float(row["avg_ts"]), float(row["stddev_ts"]),
                            tuple(float(x) for x in row.get("samples_ts", ()))))
    return tuple(out)


def _result(runs: tuple[BenchRun, ...], *, n_devices: int, rpc: int, head_layers: int, n_prompt: int, n_gen: int,
            threads: int, hosts: str, argv: list[str], pids: list[int]) -> LlamaResult:
    decode = next((r.tok_s for r in runs if r.n_prompt == 0 and r.n_gen > 0), 0.0)
    prefill = next((r.tok_s for r in runs if r.n_gen == 0 and r.n_prompt > 0), 0.0)
    return LlamaResult(n_devices, rpc, head_layers, decode, prefill, n_prompt, n_gen, threads, hosts, runs, tuple(argv),
                       tuple(pids))


# ------------------------------------------------------------------------------ measuring


def single_process(binaries: Binaries, model: Path, *, threads: int = 2, n_prompt: int = 512, n_gen: int = 128,
                   reps: int = 3, head: Host | None = None, hosts: str = "loopback",
                   openmp_env: Mapping[str, str] | None = None) -> LlamaResult:
    """llama.cpp in one process: llama-bench without --rpc, every layer on the head's CPU, with
    libgomp's defaults unless `openmp_env` (e.g. STAGE_OPENMP_ENV: on a CPU shared with other
    busy processes the default ~3 ms spin can cost a one-process run more than it gains)."""
    head = head or Loopback()
    argv = bench_argv(binaries, model, threads=threads, n_prompt=n_prompt, n_gen=n_gen, reps=reps)
    pids: list[int] = []
    runs = _runs(_run_bench(head, argv, BENCH_TIMEOUT_S, pids, openmp_env))
    return _result(runs, n_devices=1, rpc=0, head_layers=model_layers(model), n_prompt=n_prompt, n_gen=n_gen,
                   threads=threads, hosts=hosts, argv=argv, pids=pids)


def distributed(binaries: Binaries, model: Path, servers: Sequence[Host], *, head: Host | None = None,
                head_holds_layers: bool = True, threads: int = 2, n_prompt: int = 512, n_gen: int = 128,
                reps: int = 3, hosts: str = "loopback",
                openmp_env: Mapping[str, str] = STAGE_OPENMP_ENV) -> LlamaResult:
    """llama.cpp over RPC: one rpc-server per entry of `servers`, llama-bench on `head`.
    n_devices = len(servers) (+1 when the head's CPU holds layers).

    Every process runs with `openmp_env`, by default the libgomp settings EdgeMesh gives its
    pipeline stages (node/compute.py): on one machine the devices take turns on the same cores,
    and with libgomp's default ~3 ms spin an idle server's workers would burn the core the
    busy one needs, which real separate devices never do. Both systems then pay the same."""
    head = head or Loopback()
    if not servers:
        raise LlamaRpcError("a distributed run needs at least one rpc-server host")
    n_devices = len(servers) + (1 if head_holds_layers else 0)
    split = layer_split(model_layers(model), n_devices, head_holds_layers)
    pids: list[int] = []
    with tempfile.TemporaryDirectory(prefix="llama-rpc-") as work_s, \
            rpc_servers(binaries, servers, threads, Path(work_s), pids, openmp_env) as endpoints:
        argv = bench_argv(binaries, model, threads=threads, n_prompt=n_prompt, n_gen=n_gen, reps=reps,
                          endpoints=endpoints, split=split)
        runs = _runs(_run_bench(head, argv, BENCH_TIMEOUT_S, pids, openmp_env))
    return _result(runs, n_devices=n_devices, rpc=len(servers), head_layers=split.head_layers, n_prompt=n_prompt,
                   n_gen=n_gen, threads=threads, hosts=hosts, argv=argv, pids=pids)


def shape_hosts(net: Any, indices: Sequence[int], profile: str | None) -> None:
    """Give every listed host of `net` the named link profile (nothing when `profile` is None)."""
    if profile is None:
        return
    from tests.harness.link_profiles import PROFILES  # lands with the link emulation

    if profile not in PROFILES:
        raise LlamaRpcError(f"unknown link profile {profile!r} (known: {', '.join(sorted(PROFILES))})")
    for i in indices:
        net.shape(i, PROFILES[profile])


def on_testnet(binaries: Binaries, model: Path, n_devices: int, *, profile: str | None = None,
               head_holds_layers: bool = True, threads: int = 2, n_prompt: int = 512, n_gen: int = 128,
               reps: int = 3, openmp_env: Mapping[str, str] = STAGE_OPENMP_ENV) -> LlamaResult:
    """A TestNet of its own: llama-bench on host 0, one rpc-server on each further host, every
    link shaped by `profile`; the network (namespaces, links, rules, processes) is gone after."""
    from tests.system.netns import TestNet, unavailable_link_reason, unavailable_reason

    reason = unavailable_link_reason() if profile else unavailable_reason()
    if reason:
        raise LlamaRpcError(f"no test network here: {reason}")
    n_servers = n_devices - 1 if head_holds_layers else n_devices
    with tempfile.TemporaryDirectory(prefix="llama-rpc-net-") as work_s, \
            TestNet(hosts=n_servers + 1, workdir=Path(work_s)) as net:
        shape_hosts(net, range(n_servers + 1), profile)
        label = "netns" + (f"+{profile}" if profile else "")
        return distributed(binaries, model, [NetnsHost(net, i) for i in range(1, n_servers + 1)],
                           head=NetnsHost(net, 0), head_holds_layers=head_holds_layers, threads=threads,
                           n_prompt=n_prompt, n_gen=n_gen, reps=reps, hosts=label, openmp_env=openmp_env)


# ------------------------------------------------------------------------------------ CLI


def _where(r: LlamaResult) -> str:
    if r.rpc_servers == 0:
        return "1 process"
    servers = f"{r.rpc_servers} rpc-server{'s' if r.rpc_servers > 1 else ''}"
    return f"{r.n_devices} devices ({servers}, head {r.head_layers} layers)"


def _row(r: LlamaResult, base: LlamaResult | None) -> str:
    ratio = f"  decode x{r.decode_tok_s / base.decode_tok_s:.2f} of 1 process" if base and base.decode_tok_s else ""
    return (f"  {r.hosts:14s} {_where(r):42s} decode {r.decode_tok_s:7.1f} tok/s   pp{r.n_prompt} "
            f"{r.prefill_tok_s:7.1f} tok/s (ttft ~{r.ttft_s * 1000:.0f} ms){ratio}")


def _spread(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    mid = fmt.format(statistics.median(values))
    return mid if len(values) == 1 else f"{mid} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llama_rpc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="build the binaries (if not cached) and exit")
    parser.add_argument("--rebuild", action="store_true", help="build even when cached")
    parser.add_argument("--model", default="default", help="a catalogue name or a GGUF path")
    parser.add_argument("--devices", default="2,3", help="comma-separated device counts (default 2,3)")
    parser.add_argument("--net", choices=("loopback", "netns"), default="loopback")
    parser.add_argument("--profile", default=None, help="link profile for every netns host (ethernet, wifi, bad-wifi)")
    parser.add_argument("--layout", choices=("head", "remote", "both"), default="head",
                        help="head: the head's CPU is device 0 (N-1 rpc-servers, as EdgeMesh's stage 0); "
                             "remote: N rpc-servers hold every layer; both: measure each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens of the prefill test (pp)")
    parser.add_argument("--tokens", type=int, default=128, help="generated tokens of the decode test (tg)")
    parser.add_argument("--reps", type=int, default=3, help="llama-bench repetitions per run")
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved rounds (1 process, then each layout); medians are reported")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers and networks are ended on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.build or args.rebuild:
            built = ensure_built(rebuild=args.rebuild)
            print(f"rpc-server: {built.rpc_server}\nllama-bench: {built.llama_bench}")
            return 0
        binaries = cached()
        if binaries is None:
            print("llama.cpp's binaries are not built yet: python -m benchmarks.llama_rpc --build", file=sys.stderr)
            return 2
        from mesh.model_store import resolve

        model = resolve(args.model)
        counts = [int(c) for c in args.devices.split(",") if c.strip()]
        layouts = [True, False] if args.layout == "both" else [args.layout == "head"]
        kw: dict[str, Any] = {"threads": args.threads, "n_prompt": args.prompt, "n_gen": args.tokens,
                              "reps": args.reps}
        print(f"llama.cpp (llama-cpp-python {binaries.version}) on {model.name}, {model_layers(model)} layers, "
              f"{args.threads} threads, {os.cpu_count()} CPUs, {args.rounds} round(s) of {args.reps} reps")
        table: dict[str, list[tuple[LlamaResult, float]]] = {}
        for round_ in range(args.rounds):
            # The CPU may be shared: the load says how much the figures of a round can be trusted.
            print(f"round {round_ + 1} (load average {os.getloadavg()[0]:.2f}):", flush=True)
            base = single_process(binaries, model, **kw)
            print(_row(base, None), flush=True)
            table.setdefault(f"{base.hosts:14s} {_where(base)}", []).append((base, 1.0))
            for n in counts:
                for head in layouts:
                    if args.net == "loopback":
                        r = distributed(binaries, model, [Loopback()] * (n - 1 if head else n),
                                        head_holds_layers=head, **kw)
                    else:
                        r = on_testnet(binaries, model, n, profile=args.profile, head_holds_layers=head, **kw)
                    print(_row(r, base), flush=True)
                    print(f"    {' '.join(r.argv)}", flush=True)
                    table.setdefault(f"{r.hosts:14s} {_where(r)}", []).append((r, r.decode_tok_s / base.decode_tok_s))
        print("medians [min-max] over rounds; best: the fastest repetition of any round:")
        best_base = max(r.decode_best_tok_s for r, _ in next(iter(table.values())))
        for label, rows in table.items():
            decode = _spread([r.decode_tok_s for r, _ in rows])
            prefill = _spread([r.prefill_tok_s for r, _ in rows])
            ratio = _spread([x for _, x in rows], "{:.2f}")
            best = max(r.decode_best_tok_s for r, _ in rows)
            best_pp = max(r.prefill_best_tok_s for r, _ in rows)
            print(f"  {label:57s} decode {decode} tok/s   pp{args.prompt} {prefill} tok/s   decode/1 process {ratio}"
                  f"   best: decode {best:.1f} (x{best / best_base:.2f}), pp{args.prompt} {best_pp:.1f}")
    except EdgeMeshError as exc:  # LlamaRpcError and LlamaBuildError are EdgeMesh errors
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every process started was ended", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
