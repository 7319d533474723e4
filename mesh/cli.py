"""`edgemesh`: the command line of every EdgeMesh role.

Subcommands: node, gateway, up (a whole local mesh), status, chat, model, bench.
Each long-running command stops cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mesh import __version__
from mesh.config import BenchConfig, GatewayConfig, NodeConfig, PlanConfig, UpConfig, check_ports_free
from mesh.errors import ConfigError, EdgeMeshError
from mesh.logs import setup_logging
from mesh.ray.commands import add_ray_parser
from mesh.settings import add_arguments, from_arguments
from mesh.signals import run_until_signalled

log = logging.getLogger("edgemesh")

DEFAULT_URL = "http://127.0.0.1:8080"


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
    from mesh.local_mesh import run_local_mesh

    config = from_arguments(UpConfig, args)
    run_until_signalled(lambda stop: run_local_mesh(config, stop))


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

    config = from_arguments(PlanConfig, args)
    if config.url:
        print_live_plan(config.url, config.api_key)
        return
    if not config.dry_run:
        raise ConfigError("say --dry-run (plan made-up nodes offline) or --url URL (explain a gateway's live plan)")
    try:
        speeds = tuple(float(s) for s in config.speeds.split(",")) if config.speeds else ()
    except ValueError:
        raise ConfigError(f"--speeds {config.speeds!r}: give decode tokens/s per node, e.g. 30,10,10") from None
    print_dry_run(config.model, config.nodes, config.memory_limit, config.n_ctx, config.strategy, config.stages,
                  speeds)


def cmd_bench(args: argparse.Namespace) -> None:
    from mesh.bench import run_bench

    run_bench(from_arguments(BenchConfig, args))


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
    add_arguments(p, UpConfig)
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
    add_arguments(p, PlanConfig)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("bench", help="gateway streaming speed as a ratio to llama-cpp-python")
    add_arguments(p, BenchConfig)
    p.set_defaults(func=cmd_bench)
    add_ray_parser(sub)  # `edgemesh ray up|down`: building the parser imports no Ray, running a command does
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
