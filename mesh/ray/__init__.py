"""The Ray backend: `edgemesh ray up|down` runs the mesh on an existing Ray cluster.

Ray replaces mDNS discovery, process supervision and placement: every node is a named,
detached Ray actor running a real EdgeMesh node in its process, pinned round-robin to the
cluster's nodes; Ray restarts an actor whose process dies, and the gateway (in the
`ray up` process) learns the actors' addresses by asking them. Generation traffic stays
on EdgeMesh's own authenticated gRPC, never on Ray's object store.

Ray is an optional extra, so nothing outside this package imports it, and inside it
only at run time, through `import_ray`.
"""

from __future__ import annotations

from typing import Any

from mesh.errors import ConfigError

ACTOR_PREFIX = "edgemesh-node-"  # actor i is named edgemesh-node-<i>; `ray down` kills exactly these
DEFAULT_NAMESPACE = "edgemesh"


def import_ray() -> Any:
    """The `ray` module, or a clear error when the extra is not installed."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("the Ray backend needs Ray: pip install 'edgemesh[ray]'") from exc
    return ray


def actor_name(index: int) -> str:
    return f"{ACTOR_PREFIX}{index}"
