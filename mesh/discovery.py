"""Finding nodes: zeroconf advertise/browse plus static peers, yielding validated Peer records.

mDNS is discovery only. A record says "a node of our cluster may be at this address";
membership (mesh/membership.py) then checks it over authenticated gRPC and watches its
health. Records of other clusters (different cluster hash) or protocol versions are
ignored here, and every TXT field is validated before it becomes a Peer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mesh import PROTOCOL_VERSION
from mesh.config import is_loopback
from mesh.errors import ConfigError
from mesh.types import NodeId

log = logging.getLogger(__name__)

SERVICE_TYPE = "_edgemesh._tcp.local."
RESOLVE_TIMEOUT_MS = 3000  # how long to wait for a record's SRV/TXT/A answers
_NODE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CLUSTER_HASH = re.compile(r"^[0-9a-f]{12}$")


@dataclass(frozen=True)
class Peer:
    """A place where a node of our cluster can be reached; not yet proof that it is alive."""

    address: str  # host:port of its gRPC server
    node_id: NodeId | None  # known from mDNS; None for a static peer until Info answers
    metrics_port: int = 0
    source: Literal["mdns", "static", "ray"] = "static"
    # What its mDNS record says it speaks (None: not known before its Info answers). A node of
    # another version is still a peer: membership shows it as incompatible, with the reason,
    # instead of leaving a user to wonder why a device they started never appears.
    protocol_version: int | None = None


@dataclass(frozen=True)
class Advertisement:
    node_id: NodeId
    name: str
    cluster_hash: str
    grpc_port: int
    metrics_port: int
    protocol_version: int = PROTOCOL_VERSION


def parse_host_port(text: str) -> tuple[str, int]:
    """'198.18.0.2:7471' or '[::1]:7471' -> (host, port); ConfigError on anything else."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"peer address {text!r} is not HOST:PORT")
    return host, int(port_text)


def static_peers(addresses: tuple[str, ...]) -> list[Peer]:
    peers = []
    for text in addresses:
        host, port = parse_host_port(text)
        peers.append(Peer(address=f"{host}:{port}", node_id=None, source="static"))
    return peers


def _interfaces_for(host: str) -> list[str] | None:
    """Which interfaces zeroconf uses: the bound address only, or all for a wildcard bind."""
    if host in ("0.0.0.0", "::", ""):
        return None
    return [socket.gethostbyname(host)]


def _advertised_addresses(host: str) -> list[bytes]:
    if host in ("0.0.0.0", ""):
        import ifaddr  # zeroconf's own dependency for listing interfaces

        ipv4 = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)]
        return [socket.inet_aton(a) for a in ipv4 if not ipaddress.ip_address(a).is_loopback]
    return [socket.inet_aton(socket.gethostbyname(host))]


def _make_zeroconf(interfaces: list[str] | None) -> AsyncZeroconf:
    if interfaces is None:
        return AsyncZeroconf(ip_version=IPVersion.V4Only)
    return AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)


class Advertiser:
    """Publishes one node's record; `stop` sends the mDNS goodbye."""

    def __init__(self, advertisement: Advertisement, host: str) -> None:
        self._ad = advertisement
        self._host = host
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None

    async def start(self) -> None:
        ad = self._ad
        safe_name = re.sub(r"[^A-Za-z0-9-]", "-", ad.name)[:40] or "node"
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{safe_name}-{ad.node_id[:8]}.{SERVICE_TYPE}",
            addresses=_advertised_addresses(self._host),
            port=ad.grpc_port,
            properties={
                "id": ad.node_id,
                "pv": str(ad.protocol_version),
                "ch": ad.cluster_hash,
                "gp": str(ad.grpc_port),
                "mp": str(ad.metrics_port),
            },
            server=f"edgemesh-{ad.node_id[:12]}.local.",
        )
        self._zc = _make_zeroconf(_interfaces_for(self._host))
        await self._zc.async_register_service(self._info)
        log.info("advertising %s on mDNS (%s)", self._info.name, self._host)

    async def stop(self) -> None:
        if self._zc is None:
            return
        try:
            if self._info is not None:
                await self._zc.async_unregister_service(self._info)
        finally:
            await self._zc.async_close()
            self._zc = None


def peer_from_record(info: AsyncServiceInfo, cluster_hash: str) -> Peer | None:
    """Validate a resolved record; None (and a debug log) when it is not one of ours."""
    props: dict[str, str] = {}
    for key, value in (info.properties or {}).items():
        if isinstance(key, bytes) and isinstance(value, bytes):
            try:
                props[key.decode()] = value.decode()
            except UnicodeDecodeError:
                return None
    if props.get("ch") != cluster_hash or not _CLUSTER_HASH.match(props.get("ch", "")):
        log.debug("ignoring %s: other cluster", info.name)
        return None
    try:
        protocol_version = int(props.get("pv", ""))
    except ValueError:
        log.warning("ignoring %s: malformed protocol version %r", info.name, props.get("pv"))
        return None
    node_id = props.get("id", "")
    if not _NODE_ID.match(node_id):
        log.warning("ignoring %s: malformed node id", info.name)
        return None
    try:
        grpc_port = int(props.get("gp", ""))
        metrics_port = int(props.get("mp", "0"))
    except ValueError:
        log.warning("ignoring %s: malformed ports", info.name)
        return None
    if not 0 < grpc_port < 65536 or not 0 <= metrics_port < 65536 or grpc_port != info.port:
        log.warning("ignoring %s: inconsistent ports", info.name)
        return None
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not addresses:
        return None
    if protocol_version != PROTOCOL_VERSION:
        log.info("%s speaks protocol version %d, ours is %d", info.name, protocol_version, PROTOCOL_VERSION)
    return Peer(address=f"{addresses[0]}:{grpc_port}", node_id=NodeId(node_id),
                metrics_port=metrics_port, source="mdns", protocol_version=protocol_version)


class Browser:
    """Browses for nodes of one cluster and reports each validated Peer (again on every update)."""

    def __init__(self, cluster_hash: str, on_peer: Callable[[Peer], None],
                 interfaces: list[str] | None = None) -> None:
        self._cluster_hash = cluster_hash
        self._on_peer = on_peer
        self._interfaces = interfaces
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._zc = _make_zeroconf(self._interfaces)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change])

    def _on_change(self, zeroconf: object, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            # A goodbye is a hint only; membership decides liveness over gRPC.
            log.info("mDNS goodbye from %s", name)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("could not resolve %s", name)
            return
        peer = peer_from_record(info, self._cluster_hash)
        if peer is not None:
            self._on_peer(peer)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()
        self._zc = None


def browse_interfaces(gateway_host: str) -> list[str] | None:
    """A loopback-only gateway browses loopback only; otherwise all interfaces."""
    return ["127.0.0.1"] if is_loopback(gateway_host) else None
