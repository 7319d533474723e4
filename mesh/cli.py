"""`edgemesh`: the command line of every EdgeMesh role.

Subcommands: node, gateway, up (a whole local mesh), status, chat, model, bench.
Each long-running command stops cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from mesh import __version__
from mesh.config import GatewayConfig, NodeConfig, add_arguments, check_ports_free, from_arguments
from mesh.errors import ConfigError, EdgeMeshError
from mesh.logs import setup_logging
from mesh.placement.planner import STRATEGIES

log = logging.getLogger("edgemesh")

DEFAULT_URL = "http://127.0.0.1:8080"


def run_until_signalled(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run `main(stop)` where `stop` is set by the first SIGINT or SIGTERM."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


# ---------------------------------------------------------------------------- roles

def cmd_node(args: argparse.Namespace) -> None:
    from node.daemon import run_node

    config = from_arguments(NodeConfig, args)
    run_until_signalled(lambda stop: run_node(config, stop))


def cmd_gateway(args: argparse.Namespace) -> None:
    from mesh.gateway.runtime import GatewayRuntime, check_bind_is_safe
    from mesh.gateway.server import serve
    from mesh.model_store import resolve

    config = from_arguments(GatewayConfig, args)
    check_bind_is_safe(config)  # before the slow parts, so a wrong bind fails at once
    check_ports_free(config.host, (("--port", config.port),))
    runtime = GatewayRuntime(config, resolve(config.model))
    run_until_signalled(lambda stop: serve(runtime, stop))


def cmd_up(args: argparse.Namespace) -> None:
    from mesh.allowed_models import parse_allowed
    from mesh.local_mesh import LocalMeshOptions, run_local_mesh

    options = LocalMeshOptions(
        nodes=args.nodes, host=args.host, port=args.port, model=args.model, strategy=args.strategy,
        threads=args.threads, slots=args.slots, n_ctx=args.n_ctx, api_key=args.api_key,
        cluster_key=args.cluster_key, ready_file=args.ready_file, memory_limit=args.memory_limit,
        stages=args.stages, decode_threads=args.decode_threads,
        policy=args.policy, cloud_url=args.cloud_url, cloud_model=args.cloud_model, cloud_key_env=args.cloud_key_env,
        insecure_plaintext=args.insecure_plaintext,
        allowed_models=parse_allowed(args.allowed_models if args.allowed_models is not None
                                     else args._default_allowed_models),
        system_prompt_file=args.system_prompt_file, api_keys_file=args.api_keys_file,
        deny_pattern=tuple(args.deny_pattern) if args.deny_pattern is not None else args._default_deny_pattern)
    run_until_signalled(lambda stop: run_local_mesh(options, stop))


# ---------------------------------------------------------------------------- clients

def cmd_status(args: argparse.Namespace) -> None:
    from mesh.client_cli import print_status

    print_status(args.url, args.api_key)


def cmd_chat(args: argparse.Namespace) -> None:
    from mesh.client_cli import chat_loop

    chat_loop(args.url, args.api_key, max_tokens=args.max_tokens, temperature=args.temperature,
              system=args.system)


def cmd_model(args: argparse.Namespace) -> None:
    from mesh import model_store

    if args.action == "pull":
        sys.stdout.write(f"{model_store.pull(args.name)}\n")
    elif args.action == "path":
        sys.stdout.write(f"{model_store.resolve(args.name, pull=True)}\n")
    else:
        _print_model_list()


def _print_model_list() -> None:
    from mesh import model_store

    statuses = model_store.catalogue_status()
    sys.stdout.write("catalogue (`edgemesh model pull NAME`, then `--model NAME`):\n")
    sys.stdout.write(f"  {'NAME':14s} {'STATE':10s} {'SIZE':>9s}  {'ARCH':8s} {'LICENCE':11s} DESCRIPTION\n")
    for s in statuses:
        e = s.entry
        where = f"  [{s.path}]" if s.state != "not cached" else ""
        sys.stdout.write(f"  {e.name:14s} {s.state:10s} {e.size / 1e6:6.1f} MB  {e.architecture:8s} "
                         f"{e.licence:11s} {e.description}{where}\n")
        sys.stdout.write(f"  {'':14s} sha256 {e.sha256}\n")  # what the file must hash to, cached or not
        if s.state == "cached":
            sys.stdout.write(f"  {'':14s} {_provenance_line(s.path, e.sha256)}\n")
    known = {s.path.name for s in statuses}
    others = [m for m in model_store.list_cached() if m.path.name not in known]
    if others:
        sys.stdout.write("other cached GGUF files (`--model NAME` or a path):\n")
        for m in others:
            sys.stdout.write(f"  {m.name:40s} {m.size / 1e6:9.1f} MB  {m.sha256}  {m.path}\n")
            sys.stdout.write(f"  {'':40s} {_provenance_line(m.path, m.sha256)}\n")


def _provenance_line(path: Path, sha256: str) -> str:
    """What a cached GGUF says about its origin (its general.* metadata), on one line."""
    from node.gguf import provenance

    try:
        return "provenance: " + provenance(path, sha256).summary()
    except EdgeMeshError as exc:  # a file that is not a readable GGUF: say so, list the rest
        return f"provenance: unreadable ({exc})"


def cmd_plan(args: argparse.Namespace) -> None:
    from mesh.plan_cli import print_dry_run, print_live_plan

    if args.url:
        print_live_plan(args.url, args.api_key)
        return
    if not args.dry_run:
        raise ConfigError("say --dry-run (plan made-up nodes offline) or --url URL (explain a gateway's live plan)")
    speeds = tuple(float(s) for s in args.speeds.split(",")) if args.speeds else ()
    print_dry_run(args.model, args.nodes, args.memory_limit, args.n_ctx, args.strategy, args.stages, speeds)


def cmd_bench(args: argparse.Namespace) -> None:
    from mesh.bench import BenchOptions, run_bench

    run_bench(BenchOptions(model=args.model, nodes=args.nodes, tokens=args.tokens, runs=args.runs,
                           threads=args.threads, strategy=args.strategy, prefill_tokens=args.prefill_tokens,
                           decode_threads=args.decode_threads, insecure_plaintext=args.insecure_plaintext))


# ---------------------------------------------------------------------------- ray (begin)

def add_ray_commands(sub: Any) -> None:
    """`edgemesh ray up|down` (mesh/ray): building the parser imports no Ray, running a command does."""
    from mesh.ray.commands import add_ray_parser

    add_ray_parser(sub)

# ---------------------------------------------------------------------------- ray (end)


# ---------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgemesh", description="Pool your devices into one private AI assistant.")
    parser.add_argument("--version", action="version", version=f"edgemesh {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("node", help="serve a model on this device")
    add_arguments(p, NodeConfig)
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("gateway", help="serve the OpenAI API in front of the mesh")
    add_arguments(p, GatewayConfig)
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("up", help="start N nodes and a gateway on this machine")
    p.add_argument("--nodes", type=int, default=2, help="how many nodes to start [default: 2]")
    p.add_argument("--host", default="127.0.0.1", help="address of the gateway [default: 127.0.0.1]")
    p.add_argument("--port", type=int, default=8080, help="gateway HTTP port (0 picks one) [default: 8080]")
    p.add_argument("--model", default="default",
                   help="a catalogue name (see `edgemesh model list`), a cached model's file name, or a GGUF path "
                        "[default: default]")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto",
                   help="auto: replicas where the model fits, pipelines where it does not (see `edgemesh plan`); "
                        "replica: every node serves the whole model; pipeline: the nodes split its layers")
    p.add_argument("--stages", type=int, default=0,
                   help="pipeline stages (0 = as the planner finds; with --strategy pipeline, one per node)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads per node (0 = cores / nodes for replicas, all cores for pipeline stages)")
    p.add_argument("--decode-threads", type=int, default=0,
                   help="threads of a single-token pipeline step (0 = as --threads)")
    p.add_argument("--slots", type=int, default=1, help="concurrent requests per node [default: 1]")
    p.add_argument("--n-ctx", type=int, default=2048, help="context length per request [default: 2048]")
    p.add_argument("--memory-limit", default="0", help="memory each node may use, e.g. 60MB (0 = no limit)")
    p.add_argument("--api-key", default="", help="bearer key for the API (required off loopback)")
    p.add_argument("--cluster-key", default="", help="cluster key (default: a fresh one for this mesh)")
    p.add_argument("--ready-file", default="", help="write 'host port' of the gateway here once all nodes are up")
    add_arguments(p, GatewayConfig, only=("policy", "cloud_url", "cloud_model", "cloud_key_env", "insecure_plaintext",
                                          "allowed_models", "system_prompt_file", "deny_pattern", "api_keys_file"))
    p.set_defaults(func=cmd_up)

    for name, helptext, func in (("status", "show the nodes of a mesh", cmd_status),
                                 ("chat", "chat with a mesh in the terminal", cmd_chat)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--url", default=DEFAULT_URL, help=f"gateway URL [default: {DEFAULT_URL}]")
        p.add_argument("--api-key", default="", help="bearer key, if the gateway asks for one")
        p.set_defaults(func=func)
        if name == "chat":
            p.add_argument("--max-tokens", type=int, default=512)
            p.add_argument("--temperature", type=float, default=0.7)
            p.add_argument("--system", default="", help="system prompt")

    p = sub.add_parser("model", help="pull, locate and list models")
    p.add_argument("action", choices=["pull", "path", "list"])
    p.add_argument("name", nargs="?", default="default",
                   help="a catalogue name (see `edgemesh model list`); for `path`, also a cached file name or a "
                        "GGUF path [default: default]")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("plan", help="how the planner places the model, and why: offline or a live gateway's")
    p.add_argument("--dry-run", action="store_true", help="plan N made-up local nodes without starting anything")
    p.add_argument("--url", default="", help="explain the live plan of the gateway at URL, from its nodes' reports")
    p.add_argument("--api-key", default="", help="bearer key, if the gateway asks for one")
    p.add_argument("--model", default="default", help="a catalogue name (see `edgemesh model list`) or a GGUF path")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--memory-limit", default="0", help="memory each node may use (0 = free memory / nodes)")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--strategy", choices=STRATEGIES, default="auto")
    p.add_argument("--stages", type=int, default=0)
    p.add_argument("--speeds", default="", help="decode tokens/s per node, e.g. 30,10,10 (default: equal)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("bench", help="gateway streaming speed as a ratio to llama-cpp-python")
    p.add_argument("--model", default="default", help="a catalogue name (see `edgemesh model list`) or a GGUF path")
    p.add_argument("--nodes", type=int, default=1, help="nodes in the benchmarked mesh [default: 1]")
    p.add_argument("--strategy", choices=["replica", "pipeline"], default="replica")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per run [default: 128]")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each side [default: 3]")
    p.add_argument("--threads", type=int, default=0, help="threads (0 = all cores)")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill measurement")
    p.add_argument("--decode-threads", type=int, default=0,
                   help="threads of single-token pipeline steps (0 = the mesh's default)")
    p.add_argument("--insecure-plaintext", action="store_true",
                   help="run the benchmarked mesh without TLS (to measure what TLS costs)")
    p.set_defaults(func=cmd_bench)
    add_ray_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, process=(args.name if args.command == "node" and args.name else args.command))
    try:
        args.func(args)
    except EdgeMeshError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
