"""The `edgemesh ray up|down` command line. Building the parser imports no Ray; only
running a command does."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mesh.config import GatewayConfig, add_arguments
from mesh.placement.planner import STRATEGIES
from mesh.ray import DEFAULT_NAMESPACE


def add_ray_parser(sub: Any) -> None:
    """Add `ray` with its `up` and `down` subcommands to the top-level subparsers."""
    p = sub.add_parser("ray", help="run the mesh on a Ray cluster (needs the ray extra)")
    ray_sub = p.add_subparsers(dest="ray_command", required=True, metavar="ACTION")

    up = ray_sub.add_parser("up", help="start N node actors on a Ray cluster and serve the API here")
    _common(up)
    up.add_argument("--nodes", type=int, default=2, help="node actors to start [default: 2]")
    up.add_argument("--strategy", choices=STRATEGIES, default="auto",
                    help="auto: replicas where Ray's memory resource of a node holds the model, pipelines where "
                         "it does not; replica: every node serves the whole model; pipeline: they split its layers")
    up.add_argument("--stages", type=int, default=0, help="pipeline stages (0 = one per node; the rest are spare)")
    up.add_argument("--host", default="127.0.0.1", help="address of the gateway [default: 127.0.0.1]")
    up.add_argument("--port", type=int, default=8080, help="gateway HTTP port (0 picks one) [default: 8080]")
    up.add_argument("--model", default="default",
                    help="a catalogue name (see `edgemesh model list`; resolved, and pulled if need be, on each "
                         "Ray node), or a GGUF path that exists on every Ray node")
    up.add_argument("--threads", type=int, default=0,
                    help="threads per node (0 = the Ray node's CPUs shared among its node actors)")
    up.add_argument("--decode-threads", type=int, default=0,
                    help="threads of a single-token pipeline step (0 = --threads)")
    up.add_argument("--slots", type=int, default=1, help="concurrent requests per node [default: 1]")
    up.add_argument("--n-ctx", type=int, default=2048, help="context length per request [default: 2048]")
    up.add_argument("--memory-limit", default="0",
                    help="memory each node may use, e.g. 60MB (0 = the Ray node's memory resource, shared)")
    up.add_argument("--node-host", default="auto",
                    help="address the nodes bind: auto (loopback when every Ray node is on this machine, else "
                         "each Ray node's IP), ray (each Ray node's IP), or an address [default: auto]")
    up.add_argument("--node-cpus", type=float, default=0.01,
                    help="CPUs each node actor reserves in Ray's accounting; the nodes use --threads cores "
                         "whatever it says, so the default only pins them without crowding out other Ray work "
                         "[default: 0.01]")
    up.add_argument("--max-restarts", type=int, default=-1,
                    help="how often Ray restarts a node actor whose process died (-1 = always) [default: -1]")
    up.add_argument("--api-key", default="", help="bearer key for the API (required off loopback)")
    up.add_argument("--cluster-key", default="", help="cluster key (default: a fresh one for this mesh)")
    up.add_argument("--ready-file", default="", help="write 'host port' of the gateway here once all nodes are up")
    add_arguments(up, GatewayConfig, only=("policy", "cloud_url", "cloud_model", "cloud_key_env"))
    up.set_defaults(func=cmd_ray_up)

    down = ray_sub.add_parser("down", help="drain and remove the node actors `edgemesh ray up` started")
    _common(down)
    down.set_defaults(func=cmd_ray_down)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="auto",
                   help="Ray cluster address, HOST:PORT of its head (GCS) [default: auto, as ray.init finds it]")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE,
                   help=f"Ray namespace of the node actors [default: {DEFAULT_NAMESPACE}]")


def cmd_ray_up(args: argparse.Namespace) -> None:
    from mesh.cli import run_until_signalled
    from mesh.ray.launcher import RayMeshOptions, run_ray_mesh

    options = RayMeshOptions(
        address=args.address, namespace=args.namespace, nodes=args.nodes, host=args.host, port=args.port,
        model=args.model, strategy=args.strategy, stages=args.stages,
        threads=args.threads, decode_threads=args.decode_threads, slots=args.slots, n_ctx=args.n_ctx,
        memory_limit=args.memory_limit, node_host=args.node_host, node_cpus=args.node_cpus,
        max_restarts=args.max_restarts, api_key=args.api_key, cluster_key=args.cluster_key,
        ready_file=args.ready_file, policy=args.policy, cloud_url=args.cloud_url, cloud_model=args.cloud_model,
        cloud_key_env=args.cloud_key_env)
    run_until_signalled(lambda stop: run_ray_mesh(options, stop))


def cmd_ray_down(args: argparse.Namespace) -> None:
    from mesh.ray.launcher import ray_down

    names = ray_down(args.address, args.namespace)
    sys.stdout.write(f"removed {len(names)} node actor(s) from namespace {args.namespace}"
                     + (f": {', '.join(names)}\n" if names else "\n"))
