"""The `edgemesh ray up|down` command line. Building the parser imports no Ray; only
running a command does."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mesh.config import RayClusterConfig, RayUpConfig
from mesh.settings import add_arguments, from_arguments
from mesh.signals import run_until_signalled


def add_ray_parser(sub: Any) -> None:
    """Add `ray` with its `up` and `down` subcommands to the top-level subparsers."""
    p = sub.add_parser("ray", help="run the mesh on a Ray cluster (needs the ray extra)")
    ray_sub = p.add_subparsers(dest="ray_command", required=True, metavar="ACTION")

    up = ray_sub.add_parser("up", help="start N node actors on a Ray cluster and serve the API here")
    add_arguments(up, RayUpConfig)
    up.set_defaults(func=cmd_ray_up)

    down = ray_sub.add_parser("down", help="drain and remove the node actors `edgemesh ray up` started")
    add_arguments(down, RayClusterConfig)
    down.set_defaults(func=cmd_ray_down)


def cmd_ray_up(args: argparse.Namespace) -> None:
    from mesh.ray.launcher import run_ray_mesh

    config = from_arguments(RayUpConfig, args)
    run_until_signalled(lambda stop: run_ray_mesh(config, stop))


def cmd_ray_down(args: argparse.Namespace) -> None:
    from mesh.ray.launcher import ray_down

    cluster = from_arguments(RayClusterConfig, args)
    names = ray_down(cluster.address, cluster.namespace)
    sys.stdout.write(f"removed {len(names)} node actor(s) from namespace {cluster.namespace}"
                     + (f": {', '.join(names)}\n" if names else "\n"))
