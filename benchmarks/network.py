"""EdgeMesh pipelines over emulated home-network links, against llama.cpp measured in the same run.

For each link profile (tests/harness/link_profiles.py: ethernet, wifi, bad-wifi) and each
shape (1 replica, 2 stages, 3 stages) a TestNet is built (tests/system/netns.py): one host per
node and one for the gateway, every host's link shaped by the profile. The devices run the
README's own commands, `edgemesh node --model PATH --name N --host <addr> --memory-limit M`
and `edgemesh gateway --host <addr>`; the memory limits are the ones the placement tests use
to make the gateway's planner choose exactly that many stages (checked: a cell whose plan has
another shape stops with an error). This process is the client, in the root namespace.

Measured per cell, `--runs` times, interleaved with llama.cpp in this process
(llama-cpp-python, `--threads` threads, as `edgemesh bench` does, mesh/bench.py):
  decode   tokens/s of a streamed greedy completion of --tokens tokens (first token excluded)
  ttft     time to the first token of a --prompt-tokens prompt (default 512)
  bytes    per generated token, from the nodes' /metrics: hidden states sent down the pipeline
           (edgemesh_node_pipeline_bytes_total) and RPC payload bytes sent + received
           (edgemesh_node_bytes_{sent,received}_total), summed over nodes; the decode run's
           counts minus those of a 1-token run of the same prompt, so its prefill is not counted
Every process of the run, llama.cpp in this one included, uses the nodes' OpenMP settings
(node/compute.py STAGE_OPENMP_ENV; `--baseline-default-omp` leaves this process's at libgomp's
defaults). Each figure is printed as its median with the min-max over runs, and as ratios to
  (a) llama.cpp in one process, measured in the same cell;
  (b) the physical floor (see `floor_ms_per_token` and `floor_ttft_ms`);
  (c) llama.cpp's RPC mode (benchmarks/llama_rpc.py) with the same number of devices on a
      TestNet of its own with the same profile (llama-bench: tg for decode, pp for the ttft
      estimate); skipped, with a note, when its binaries are not built (`--build-rpc`).

    python -m benchmarks.network                                   # every profile and shape, 3 runs
    python -m benchmarks.network --profiles wifi,ethernet --shapes 3
    python -m benchmarks.network --quick --profiles ethernet --shapes 3   # a smoke test, ~1 min

Everything started (processes, namespaces, links, rules) is ended and removed when a cell is
done, also on Ctrl-C or SIGTERM. Needs root (network namespaces, iptables, NFQUEUE).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mesh.bench import BENCH_PROMPT, RunTiming, baseline_run, long_prompt, mesh_run
from mesh.errors import EdgeMeshError
from mesh.llama_runtime import install
from mesh.ready_file import read_ready

log = logging.getLogger("network_bench")

REPO = Path(__file__).resolve().parents[1]
# Memory limits that make the planner choose the shape (as in tests/system/test_placement_netns.py
# and test_pipeline_links.py; `edgemesh plan --dry-run --nodes N --memory-limit M` shows it).
MEMORY_LIMITS = {1: "400MB", 2: "110MB", 3: "60MB"}
SHAPE_NAMES = {1: "1 replica", 2: "2 stages", 3: "3 stages"}
START_TIMEOUT_S = 180.0
PLAN_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 300.0
# The targets, on wifi with 3 stages.
TARGET_PROFILE, TARGET_STAGES = "wifi", 3
TARGET_FLOOR_X = 1.15  # decode time per token <= 1.15 x floor
TARGET_RPC_X = 2.0  # decode speed >= 2 x llama.cpp RPC's


class NetworkBenchError(EdgeMeshError):
    """The benchmark could not set a cell up or measure it."""


# ------------------------------------------------------------------------------ floors


def floor_ms_per_token(one_process_ms: float, stages: int, delay_ms: float) -> float:
    """The least a decode step can take: the one-process compute time plus the one-way hops a
    token must wait for. A ring of N stages waits for N hops a token (stage k -> k+1, and the
    last stage's token back to the head). A replica waits for none: its node streams tokens
    to the gateway without waiting for anything, so the link's delay is paid once, in the time
    to the first token, not per token."""
    hops = stages if stages > 1 else 0
    return one_process_ms + hops * delay_ms


def floor_ttft_ms(one_process_ms: float, stages: int, delay_ms: float) -> float:
    """The least the first token can take: one-process prefill plus the one-way hops on its way,
    gateway -> head, the ring's N hops for a pipeline, head -> gateway and gateway -> client
    (the client's own, root-namespace link is not shaped). The hidden states' transfer time is
    left out: overlapping prefill can hide it behind compute, so it is not part of a floor."""
    hops = 3 + (stages if stages > 1 else 0)
    return one_process_ms + hops * delay_ms


def floor_bytes_per_token(stages: int, n_embd: int) -> int:
    """Hidden states of one token, f32, once per hop between stages (N - 1 of them)."""
    return (stages - 1) * n_embd * 4


# ------------------------------------------------------------------------------ the mesh


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    ready: Path

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class LanMesh:
    """A gateway and nodes on TestNet hosts, each started with the README's command."""

    net: Any  # tests.system.netns.TestNet
    workdir: Path
    model: Path
    threads: int
    activation_dtype: str = "f32"  # the gateway's --activation-dtype
    stage_wire: str = "step"  # step: the nodes' step sockets (a ring); grpc: --step-port -1 (Forward streams, a hub)
    cluster_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    procs: dict[str, _Proc] = field(default_factory=dict)

    def _start(self, name: str, args: list[str]) -> _Proc:
        host = self.net.add_host()  # shaped by the network's profile as it is added
        ready = self.workdir / f"{name}.ready"
        log_path = self.workdir / f"{name}.log"
        env = {**os.environ, "EDGEMESH_CLUSTER_KEY": self.cluster_key, "EDGEMESH_API_KEY": self.api_key,
               # processes take turns on the cores: idle OpenMP workers must sleep, not spin
               "OMP_WAIT_POLICY": "PASSIVE"}
        argv = [sys.executable, "-m", "mesh.cli", *args, "--host", host.address, "--ready-file", str(ready)]
        with open(log_path, "wb") as out:
            popen = self.net.popen(host.index, argv, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, cwd=REPO)
        proc = _Proc(name, popen, log_path, ready)
        self.procs[name] = proc
        return proc

    def add_gateway(self) -> None:
        self._start("gateway", ["gateway", "--model", str(self.model), "--port", "0",
                                "--activation-dtype", self.activation_dtype])

    def add_node(self, name: str, memory_limit: str) -> None:
        self._start(name, ["node", "--model", str(self.model), "--name", name, "--port", "0", "--metrics-port", "0",
                           "--step-port", "0" if self.stage_wire == "step" else "-1", "--threads", str(self.threads),
                           "--memory-limit", memory_limit])

    def ready_fields(self, name: str) -> list[str]:
        proc = self.procs[name]
        deadline = time.monotonic() + START_TIMEOUT_S
        while read_ready(proc.ready) is None:
            if proc.popen.poll() is not None:
                raise NetworkBenchError(f"{name} exited with {proc.popen.returncode}:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise NetworkBenchError(f"{name} not ready after {START_TIMEOUT_S:.0f} s:\n{proc.tail()}")
            time.sleep(0.05)
        return proc.ready.read_text().split()

    @property
    def url(self) -> str:
        host, port = self.ready_fields("gateway")[:2]
        return f"http://{host}:{port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def cluster(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/api/cluster", headers=self.headers, timeout=10, trust_env=False)
        response.raise_for_status()
        view: dict[str, Any] = response.json()
        return view

    def wait_plan(self, stages: int) -> list[str]:
        """Until the controller's plan is loaded and routed; returns its stages' node ids.
        Raises when it settles on another shape than `stages` (the memory limits no longer
        steer the planner as they did)."""
        node_ids = {self.ready_fields(n)[3] for n in self.procs if n != "gateway"}
        deadline = time.monotonic() + PLAN_TIMEOUT_S
        view: dict[str, Any] = {}
        while time.monotonic() < deadline:
            view = self.cluster()
            placement = view["placement"]
            plan, routed = placement["plan"], view["placements"]
            ready = {n["id"] for n in view["nodes"] if n["state"] == "ready"}
            if placement["active"] and placement["converged"] and plan and ready == node_ids and \
                    _shape(plan) == _shape(routed):
                if len(plan) != 1 or len(plan[0]["stages"]) != stages:
                    raise NetworkBenchError(f"the planner chose {_shape(plan)}, not {stages} stage(s): "
                                            f"adjust MEMORY_LIMITS")
                return [s["node"] for s in plan[0]["stages"]]
            time.sleep(0.2)
        raise NetworkBenchError(f"no settled plan over {len(node_ids)} node(s) within {PLAN_TIMEOUT_S:.0f} s: "
                                f"{str(view.get('placement'))[:2000]}\n{self.procs['gateway'].tail()}")

    def node_counters(self) -> tuple[float, float]:
        """(pipeline hidden-state bytes, RPC payload bytes sent + received), summed over nodes."""
        pipeline = rpc = 0.0
        for name in self.procs:
            if name == "gateway":
                continue
            host, _port, metrics_port = self.ready_fields(name)[:3]
            text = httpx.get(f"http://{host}:{metrics_port}/metrics", timeout=10, trust_env=False).text
            pipeline += _metric_sum(text, "edgemesh_node_pipeline_bytes_total")
            rpc += _metric_sum(text, "edgemesh_node_bytes_sent_total")
            rpc += _metric_sum(text, "edgemesh_node_bytes_received_total")
        return pipeline, rpc


def _shape(placements: list[dict[str, Any]]) -> list[tuple[str, list[tuple[str, tuple[int, int]]]]]:
    return sorted((p["kind"], [(s["node"], tuple(s["layers"])) for s in p["stages"]]) for p in placements)


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            if key == name or key.startswith(name + "{"):
                total += float(value)
    return total


# ------------------------------------------------------------------------------ measuring


@dataclass(frozen=True)
class Run:
    """One run of a cell: EdgeMesh and llama.cpp in this process, back to back."""

    mesh: RunTiming
    mesh_ttft_s: float
    base: RunTiming
    base_ttft_s: float
    pipeline_bytes_per_token: float
    rpc_bytes_per_token: float


@dataclass(frozen=True)
class RpcFigures:
    decode_tok_s: float
    ttft_s: float


@dataclass(frozen=True)
class Cell:
    profile: str
    stages: int
    delay_ms: float
    runs: tuple[Run, ...]
    rpc: RpcFigures | None
    rpc_note: str
    n_embd: int


@dataclass(frozen=True)
class Settings:
    model: Path
    threads: int
    tokens: int
    prompt_tokens: int
    runs: int
    activation_dtype: str = "f32"
    stage_wire: str = "step"


def _stream(mesh: LanMesh, tokens: int, prompt: str) -> RunTiming:
    async def once() -> RunTiming:
        async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S), headers=mesh.headers,
                                     trust_env=False) as client:
            return await mesh_run(client, mesh.url, tokens, prompt)

    return asyncio.run(once())


def measure_mesh_cell(settings: Settings, profile_name: str, stages: int, llm: Any, baseline: ThreadPoolExecutor,
                      prefill_prompt: str, progress: Callable[[str], None]) -> list[Run]:
    from tests.harness.link_profiles import PROFILES
    from tests.system.netns import TestNet

    profile = PROFILES[profile_name]

    def base(tokens: int, prompt: str) -> RunTiming:
        # llama.cpp always on its one thread (libgomp: a team per calling thread, see mesh/bench.py)
        return baseline.submit(baseline_run, llm, tokens, prompt).result()

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="edgemesh-netbench-") as work_s, \
            TestNet(0, Path(work_s), profile=profile) as net:
        mesh = LanMesh(net, Path(work_s), settings.model, settings.threads, settings.activation_dtype,
                       settings.stage_wire)
        started = time.monotonic()
        mesh.add_gateway()
        for k in range(stages):
            mesh.add_node(f"dev-{k}", MEMORY_LIMITS[stages])
        route = mesh.wait_plan(stages)
        progress(f"  mesh on network em-{net.tag} (198.18.{net.subnet}.0/24) ready in "
                 f"{time.monotonic() - started:.1f} s, {len(route)} stage(s)")
        _stream(mesh, 8, BENCH_PROMPT)  # warm-up: the first request pays for lazy set-up
        base(8, BENCH_PROMPT)
        for k in range(settings.runs):
            progress(f"  run {k + 1} of {settings.runs}: decode ({settings.tokens} tokens)")
            b = base(settings.tokens, BENCH_PROMPT)
            before = mesh.node_counters()
            m = _stream(mesh, settings.tokens, BENCH_PROMPT)
            after = mesh.node_counters()
            _stream(mesh, 1, BENCH_PROMPT)  # the same prompt's prefill and first token alone
            after_one = mesh.node_counters()
            extra = max(m.tokens - 1, 1)
            pipe = ((after[0] - before[0]) - (after_one[0] - after[0])) / extra
            rpc = ((after[1] - before[1]) - (after_one[1] - after[1])) / extra
            progress(f"  run {k + 1} of {settings.runs}: time to first token ({settings.prompt_tokens}-token prompt)")
            b_ttft = base(1, prefill_prompt).first_token_s
            m_one = _stream(mesh, 1, prefill_prompt)
            runs.append(Run(m, m_one.first_token_s or m_one.total_s, b, b_ttft, pipe, rpc))
            progress(f"  run {k + 1} of {settings.runs}: edgemesh {m.decode_tps:.1f} tok/s, llama.cpp "
                     f"{b.decode_tps:.1f} tok/s; ttft {runs[-1].mesh_ttft_s * 1000:.0f} ms vs "
                     f"{b_ttft * 1000:.0f} ms")
        progress("  ending the mesh and removing its network")
    return runs


def measure_rpc(settings: Settings, profile_name: str, stages: int,
                progress: Callable[[str], None]) -> tuple[RpcFigures | None, str]:
    """llama.cpp's RPC mode with `stages` devices on `profile_name`'s links: llama-bench on
    host 0, whose CPU holds the first layers as EdgeMesh's head does, and an rpc-server on each
    of the other stages - 1 hosts. (None, why) when not measured."""
    if stages < 2:
        return None, "n/a: one device"
    from benchmarks.llama_build import cached
    from benchmarks.llama_rpc import NetnsHost, distributed
    from tests.harness.link_profiles import PROFILES
    from tests.system.netns import TestNet

    binaries = cached()
    if binaries is None:
        return None, "skipped: llama.cpp RPC binaries not built (--build-rpc)"
    with tempfile.TemporaryDirectory(prefix="edgemesh-netbench-rpc-") as work_s, \
            TestNet(stages, Path(work_s), profile=PROFILES[profile_name]) as net:
        progress(f"  llama.cpp RPC on network em-{net.tag} (198.18.{net.subnet}.0/24): {stages} devices, "
                 f"{settings.runs} rep(s) of pp{settings.prompt_tokens} and tg{settings.tokens}")
        result = distributed(binaries, settings.model, [NetnsHost(net, i) for i in range(1, stages)],
                             head=NetnsHost(net, 0), head_holds_layers=True, threads=settings.threads,
                             n_prompt=settings.prompt_tokens, n_gen=settings.tokens, reps=settings.runs,
                             hosts=f"netns+{profile_name}")
        progress(f"  llama.cpp RPC: decode {result.decode_tok_s:.1f} tok/s, pp{settings.prompt_tokens} "
                 f"{result.prefill_tok_s:.1f} tok/s; removing its network")
    return RpcFigures(result.decode_tok_s, result.ttft_s), f"{stages} devices ({result.rpc_servers} rpc-servers)"


# ------------------------------------------------------------------------------ the table


def _spread(values: Sequence[float], fmt: str) -> str:
    mid = fmt.format(statistics.median(values))
    return mid if len(values) == 1 else f"{mid} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def _med(values: Sequence[float]) -> float:
    return statistics.median(values)


def render(cells: Sequence[Cell], settings: Settings) -> str:
    omp = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ)
    lines = [f"\nmodel {settings.model.name}, {settings.threads} threads per process, {settings.tokens} decode tokens, "
             f"{settings.prompt_tokens}-token prompt, {settings.runs} run(s): median [min-max]; "
             f"stage wire {settings.stage_wire}, activation dtype {settings.activation_dtype}; "
             f"load average now {os.getloadavg()[0]:.2f}; one-process llama.cpp with {omp or 'libgomp defaults'}",
             "ratios: speed x = EdgeMesh / other (higher is better); time x = EdgeMesh / other (lower is better); "
             "floor = one-process time + the link's one-way hops (replica: none per token)", "",
             "decode"]
    head = (f"  {'profile':9s} {'shape':10s} {'tok/s':>20s} {'ms/token':>8s} {'1-proc tok/s':>12s} "
            f"{'speed x1-proc':>18s} {'floor ms':>8s} {'time x floor':>18s} {'RPC tok/s':>9s} {'speed xRPC':>10s}  "
            "target")
    lines.append(head)
    for c in cells:
        # Ratios are taken per run (EdgeMesh and llama.cpp back to back, so drift in the load
        # hits both), then their median and spread are shown.
        mesh_tps = [r.mesh.decode_tps for r in c.runs]
        base_tps = _med([r.base.decode_tps for r in c.runs])
        speed_x = [r.mesh.decode_tps / r.base.decode_tps for r in c.runs if r.base.decode_tps]
        floor_x = [(1000 / r.mesh.decode_tps) / floor_ms_per_token(1000 / r.base.decode_tps, c.stages, c.delay_ms)
                   for r in c.runs if r.mesh.decode_tps and r.base.decode_tps]
        ms = 1000 / _med(mesh_tps) if _med(mesh_tps) else float("inf")
        floor = floor_ms_per_token(1000 / base_tps, c.stages, c.delay_ms) if base_tps else float("inf")
        rpc_tps = f"{c.rpc.decode_tok_s:9.1f}" if c.rpc else f"{'-':>9s}"
        rpc_x = f"{_med(mesh_tps) / c.rpc.decode_tok_s:10.2f}" if c.rpc and c.rpc.decode_tok_s else f"{'-':>10s}"
        target = ""
        if c.profile == TARGET_PROFILE and c.stages == TARGET_STAGES:
            floor_ok = bool(floor_x) and _med(floor_x) <= TARGET_FLOOR_X
            rpc_ok = bool(c.rpc and _med(mesh_tps) >= TARGET_RPC_X * c.rpc.decode_tok_s)
            target = (f"time x floor <= {TARGET_FLOOR_X}: {'met' if floor_ok else 'NOT met'}; "
                      f"speed x RPC >= {TARGET_RPC_X}: {('met' if rpc_ok else 'NOT met') if c.rpc else 'not measured'}")
        lines.append(f"  {c.profile:9s} {SHAPE_NAMES[c.stages]:10s} {_spread(mesh_tps, '{:.1f}'):>20s} {ms:8.2f} "
                     f"{base_tps:12.1f} {_spread(speed_x, '{:.2f}'):>18s} {floor:8.2f} "
                     f"{_spread(floor_x, '{:.2f}'):>18s} {rpc_tps} {rpc_x}  {target}")
    lines += ["", f"time to first token, {settings.prompt_tokens}-token prompt",
              f"  {'profile':9s} {'shape':10s} {'ms':>22s} {'1-proc ms':>9s} {'time x1-proc':>18s} "
              f"{'floor ms':>8s} {'time x floor':>18s} {'RPC ms':>8s} {'time xRPC':>9s}"]
    for c in cells:
        ttft = [r.mesh_ttft_s * 1000 for r in c.runs]
        base_ms = _med([r.base_ttft_s * 1000 for r in c.runs])
        floor = floor_ttft_ms(base_ms, c.stages, c.delay_ms)
        time_x = [r.mesh_ttft_s / r.base_ttft_s for r in c.runs if r.base_ttft_s]
        floor_x = [r.mesh_ttft_s * 1000 / floor_ttft_ms(r.base_ttft_s * 1000, c.stages, c.delay_ms) for r in c.runs]
        rpc_ms = f"{c.rpc.ttft_s * 1000:8.0f}" if c.rpc else f"{'-':>8s}"
        rpc_x = f"{_med(ttft) / (c.rpc.ttft_s * 1000):9.2f}" if c.rpc and c.rpc.ttft_s else f"{'-':>9s}"
        lines.append(f"  {c.profile:9s} {SHAPE_NAMES[c.stages]:10s} {_spread(ttft, '{:.0f}'):>22s} {base_ms:9.0f} "
                     f"{_spread(time_x, '{:.2f}'):>18s} {floor:8.0f} {_spread(floor_x, '{:.2f}'):>18s} "
                     f"{rpc_ms} {rpc_x}")
    lines += ["", "bytes per generated token (prefill excluded), summed over nodes",
              f"  {'profile':9s} {'shape':10s} {'hidden states':>22s} {'floor':>6s} {'x floor':>7s} "
              f"{'RPC payload sent+received':>28s}"]
    for c in cells:
        pipe = [r.pipeline_bytes_per_token for r in c.runs]
        rpc = [r.rpc_bytes_per_token for r in c.runs]
        floor_b = floor_bytes_per_token(c.stages, c.n_embd)
        x = f"{_med(pipe) / floor_b:7.2f}" if floor_b else f"{'-':>7s}"
        lines.append(f"  {c.profile:9s} {SHAPE_NAMES[c.stages]:10s} {_spread(pipe, '{:.0f}'):>22s} {floor_b:6d} {x} "
                     f"{_spread(rpc, '{:.0f}'):>28s}")
    notes = [f"  {c.profile} {SHAPE_NAMES[c.stages]}: llama.cpp RPC {c.rpc_note}" for c in cells]
    lines += ["", "llama.cpp RPC (benchmarks/llama_rpc.py, llama-bench on its own network, same profile): decode from "
              "its tg test, first token estimated from its pp rate (prompt / rate, no network hops counted):",
              *notes]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ CLI


def _interrupt_on_sigterm() -> None:
    """SIGTERM ends the run as Ctrl-C does: every context manager (networks, processes) unwinds."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.network", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="a catalogue name or a GGUF path")
    parser.add_argument("--profiles", default="ethernet,wifi,bad-wifi", help="comma-separated link profiles")
    parser.add_argument("--shapes", default="1,2,3", help="comma-separated stage counts (1 = a replica)")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell (medians are reported)")
    parser.add_argument("--tokens", type=int, default=128, help="decode tokens per run")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt tokens of the first-token test")
    parser.add_argument("--threads", type=int, default=2, help="threads of llama.cpp and of every node")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 1 run, 32 tokens, the first profile of --profiles only")
    parser.add_argument("--build-rpc", action="store_true",
                        help="build llama.cpp's rpc-server and llama-bench first (cached after the first time)")
    parser.add_argument("--no-rpc", action="store_true", help="do not measure llama.cpp's RPC mode")
    parser.add_argument("--activation-dtype", default="f32", choices=("f32", "f16", "q8_0", "auto"),
                        help="the gateway's --activation-dtype (f32 keeps llama.cpp's output)")
    parser.add_argument("--stage-wire", default="step", choices=("step", "grpc"),
                        help="step: stages talk over their step sockets (a ring from 3 stages); grpc: nodes "
                             "start with --step-port -1 and the head reaches each stage over a gRPC Forward "
                             "stream (a hub)")
    parser.add_argument("--baseline-default-omp", action="store_true",
                        help="run the one-process llama.cpp with libgomp's default spinning instead of the "
                             "nodes' OpenMP settings (node/compute.py STAGE_OPENMP_ENV)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore", "llama_rpc", "llama_build"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from tests.harness.link_profiles import PROFILES
    from tests.system.netns import unavailable_link_reason

    profiles = _csv(args.profiles)
    unknown = [p for p in profiles if p not in PROFILES]
    shapes = [int(s) for s in _csv(args.shapes)]
    if unknown or not profiles:
        parser.error(f"unknown profile(s) {unknown}; known: {', '.join(PROFILES)}")
    if not shapes or any(s not in MEMORY_LIMITS for s in shapes):
        parser.error(f"shapes are among {sorted(MEMORY_LIMITS)}")
    if args.quick:
        args.runs, args.tokens, profiles = 1, 32, profiles[:1]
    reason = unavailable_link_reason()
    if reason:
        print(f"cannot emulate links here: {reason}", file=sys.stderr)
        return 2
    if not args.baseline_default_omp:
        # Like for like: the one-process llama.cpp gets the OpenMP settings every node runs
        # with. libgomp reads them once, when llama_cpp loads it, so they are set before that.
        # With libgomp's default (spin ~3 ms at each barrier) a 2-thread team on a machine
        # whose cores other processes also want loses its turn at every op: measured here at
        # load ~6 on 2 cores, 1.8-2.1 tok/s in one process against 25 tok/s through 3 stages.
        from node.compute import STAGE_OPENMP_ENV

        os.environ.update(STAGE_OPENMP_ENV)
    _interrupt_on_sigterm()
    try:
        if args.build_rpc:
            from benchmarks.llama_build import ensure_built

            ensure_built()
        return _run(args, profiles, shapes)
    except KeyboardInterrupt:
        log.info("interrupted: everything started was ended and its network removed")
        return 130
    except EdgeMeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, profiles: list[str], shapes: list[int]) -> int:
    import llama_cpp

    from mesh.model_store import resolve
    from node.gguf import inspect
    from tests.harness.link_profiles import PROFILES

    model = resolve(args.model)
    n_embd = inspect(model).n_embd
    settings = Settings(model, args.threads, args.tokens, args.prompt_tokens, args.runs, args.activation_dtype,
                        args.stage_wire)
    install()  # loaded as a node loads it (mesh.llama_runtime)
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                          n_batch=512, verbose=False)
    prefill_prompt = long_prompt(llm, args.prompt_tokens)
    cells: list[Cell] = []
    total = len(profiles) * len(shapes)
    log.info("load average at start: %s", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama.cpp") as baseline:
        for profile in profiles:
            for stages in shapes:
                log.info("cell %d of %d: %s, %s", len(cells) + 1, total, profile, SHAPE_NAMES[stages])
                runs = measure_mesh_cell(settings, profile, stages, llm, baseline, prefill_prompt, log.info)
                if args.no_rpc:
                    rpc, note = None, "skipped (--no-rpc)"
                else:
                    rpc, note = measure_rpc(settings, profile, stages, log.info)
                cells.append(Cell(profile, stages, PROFILES[profile].delay_ms, tuple(runs), rpc, note, n_embd))
    llm.close()
    print(render(cells, settings), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
