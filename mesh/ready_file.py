"""The ready file: how a process tells its supervisor that it serves, and where.

A node writes 'host port metrics_port node_id', a gateway (and `edgemesh up`/`ray up`, for
their gateway) 'host port', one line each, with `--ready-file PATH`. The file appears whole
(written aside, then renamed), so a reader polling for it never sees half a line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import ConfigError
from mesh.types import NodeId


@dataclass(frozen=True)
class NodeReady:
    host: str
    port: int
    metrics_port: int
    node_id: NodeId

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class GatewayReady:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def write_ready(path: str | Path, ready: NodeReady | GatewayReady) -> None:
    """Write the ready line for `ready` to `path`, atomically."""
    if isinstance(ready, NodeReady):
        line = f"{ready.host} {ready.port} {ready.metrics_port} {ready.node_id}"
    else:
        line = f"{ready.host} {ready.port}"
    target = Path(path)
    aside = target.with_name(f".{target.name}.{os.getpid()}")
    aside.write_text(line + "\n")
    os.replace(aside, target)


def _fields(path: str | Path, count: int) -> list[str] | None:
    try:
        fields = Path(path).read_text().split()
    except FileNotFoundError:
        return None
    if len(fields) != count:
        raise ConfigError(f"ready file {path} says {' '.join(fields)!r}; expected {count} fields")
    return fields


def read_node_ready(path: str | Path) -> NodeReady | None:
    """A node's ready file, or None while it has not written one."""
    fields = _fields(path, 4)
    if fields is None:
        return None
    host, port, metrics_port, node_id = fields
    return NodeReady(host, _port(path, port), _port(path, metrics_port), NodeId(node_id))


def read_gateway_ready(path: str | Path) -> GatewayReady | None:
    """A gateway's (or a launcher's) ready file, or None while it has not written one."""
    fields = _fields(path, 2)
    if fields is None:
        return None
    return GatewayReady(fields[0], _port(path, fields[1]))


def read_ready(path: str | Path) -> NodeReady | GatewayReady | None:
    """Either kind of ready file, told apart by its fields (for a supervisor of both kinds)."""
    try:
        count = len(Path(path).read_text().split())
    except FileNotFoundError:
        return None
    return read_node_ready(path) if count == 4 else read_gateway_ready(path)


def _port(path: str | Path, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"ready file {path}: {text!r} is not a port") from None
