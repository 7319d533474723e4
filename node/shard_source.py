"""Find a peer that holds the model file whole, for `edgemesh node --model-from-peers`."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from mesh.allowed_models import AllowedModels
from mesh.config import Limits, NodeConfig, Timeouts, home_dir
from mesh.discovery import Browser, Peer, browse_interfaces, static_peers
from mesh.errors import ConfigError, EdgeMeshError, ModelNotAllowed, Unavailable
from mesh.transport.auth import cluster_hash
from mesh.transport.channels import NodeClient
from node.gguf import check_header
from node.shards import ShardCache
from node.stage_host import LocalFile

log = logging.getLogger(__name__)

SOURCE_SEARCH_S = 30.0  # how long a node looks for a peer with the model file before giving up


async def _candidates(config: NodeConfig, cluster_key: str, deadline: float) -> list[Peer]:
    """Static peers first, then whatever mDNS finds before the deadline."""
    found: list[Peer] = list(static_peers(config.peer))
    if found:
        return found
    browser = Browser(cluster_hash(cluster_key), found.append, browse_interfaces(config.host))
    await browser.start()
    try:
        while not found and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # let the other answers of the same burst arrive
    finally:
        await browser.stop()
    return found


async def shard_file_from_peers(config: NodeConfig, cluster_key: str, timeouts: Timeouts,
                                limits: Limits) -> LocalFile:
    """A sparse local copy of the model of the first peer that can ship it (header fetched,
    layers fetched later, on LoadStage), and that peer as the source of the missing bytes."""
    if config.role == "replica":
        raise ConfigError("--model-from-peers serves pipeline stages only: drop --role replica (a replica needs "
                          "the whole file)")
    allowed = AllowedModels(config.allowed_models)
    refused: set[str] = set()  # models peers offered that --allow-model does not allow
    deadline = time.monotonic() + SOURCE_SEARCH_S
    while time.monotonic() < deadline:
        for peer in await _candidates(config, cluster_key, deadline):
            client = NodeClient(peer.address, cluster_key, timeouts, limits, node_id=peer.node_id)
            try:
                info = await client.info()
                for model in (m for m in info.files if not m.shard_copy):  # a shard copy cannot ship
                    if not allowed.permits(model.sha256):  # nothing of it is fetched nor cached
                        if model.sha256 not in refused:
                            log.info("%s offers model %s (%s), which is not in --allow-model", info.name,
                                     model.name, model.sha256)
                        refused.add(model.sha256)
                        continue
                    cache = ShardCache(home_dir() / "shards", replace(model, n_ctx=config.n_ctx, shard_copy=True))
                    if not cache.has_header:
                        await cache.fetch(client, [], header=True)
                    # The header came from a peer: every length in it is checked against the file
                    # before anything (the stage engine's reader, llama.cpp) trusts it.
                    check_header(cache.path)
                    log.info("model %s comes from %s (%s); %.1f MB of it already cached", model.name, info.name,
                             peer.address, cache.present_bytes() / 1e6)
                    return LocalFile(cache.path, cache.model, shards=cache, source=client)
            except EdgeMeshError as exc:
                log.info("%s cannot ship the model: %s", peer.address, exc)
            await client.close()
        await asyncio.sleep(1.0)
    if refused:
        raise ModelNotAllowed(f"no peer offered an allowed model within {SOURCE_SEARCH_S:.0f}s: they hold only "
                              f"{', '.join(sorted(refused))}, not in --allow-model ({allowed.describe()})")
    raise Unavailable(f"no peer with the model file answered within {SOURCE_SEARCH_S:.0f}s "
                      "(start a node that has it, or give one with --peer HOST:PORT)")


class ShardPeers:
    """Connections to peers a shard copy may fetch layers from besides its first source
    (the controller names them in LoadStage): each must prove the cluster key first."""

    def __init__(self, cluster_key: str, timeouts: Timeouts, limits: Limits) -> None:
        self._key, self._timeouts, self._limits = cluster_key, timeouts, limits
        self._clients: dict[str, NodeClient] = {}

    async def connect(self, address: str) -> NodeClient:
        client = self._clients.get(address)
        if client is None:
            client = NodeClient(address, self._key, self._timeouts, self._limits)
            try:
                await client.info()  # the peer proves the key before any of its bytes is trusted
            except EdgeMeshError:
                await client.close()
                raise
            self._clients[address] = client
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
