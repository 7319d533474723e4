"""The gateway process: discovery + membership + scheduler + tokenizer behind the HTTP app."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from mesh.allowed_models import AllowedModels
from mesh.config import GatewayConfig, is_loopback, resolve_cluster_key
from mesh.discovery import Browser, Peer, browse_interfaces, static_peers
from mesh.errors import ConfigError
from mesh.gateway.api_keys import ApiKeys
from mesh.gateway.completions import POLICIES, Completions
from mesh.gateway.embeddings import Embeddings
from mesh.gateway.policy import GatewayPolicy
from mesh.gateway.web_access import parse_aliases, parse_origins
from mesh.membership import Member, Membership, MemberState
from mesh.metrics import GatewayMetrics
from mesh.placement.controller import ControllerSettings, PlacementController
from mesh.placement.planner import STRATEGIES
from mesh.scheduler import Scheduler
from mesh.tokenizer import TemplateBudget, Tokenizer
from mesh.transport import tls
from mesh.transport.auth import cluster_hash
from mesh.types import ACTIVATION_DTYPES, ModelSha, NodeInfo

if TYPE_CHECKING:
    from mesh.cloud import CloudUpstream

log = logging.getLogger(__name__)

CLOUD_PROBE_S = 2.0  # how often the cloud's health is checked in the background


def check_bind_is_safe(config: GatewayConfig) -> None:
    """Secure by default: a gateway reachable from the network must ask for a key, and a key
    must be one a client can send."""
    if config.api_key and not config.api_key.strip():
        # A blank key (an unset variable in quotes, say) would "protect" a public bind with
        # a key of spaces, which HTTP strips from the header: refuse it rather than guess.
        raise ConfigError("--api-key is blank: pass a real key (or EDGEMESH_API_KEY), or none on 127.0.0.1")
    if config.api_key != config.api_key.strip():
        raise ConfigError("--api-key starts or ends with whitespace, which HTTP drops from the Authorization "
                          "header, so no client could send it: remove the spaces")
    if not is_loopback(config.host) and not config.api_key and not config.api_keys_file:
        raise ConfigError(
            f"refusing to serve on {config.host} without an API key: anyone on the network could use "
            "the mesh. Pass --api-key KEY (or EDGEMESH_API_KEY) or --api-keys-file, or bind 127.0.0.1.")


class GatewayRuntime:
    def __init__(self, config: GatewayConfig, model_path: Path) -> None:
        from node.gguf import file_sha256, provenance
        from node.gguf import inspect as inspect_gguf
        from node.profile import model_profile

        check_bind_is_safe(config)
        tls.use_plaintext(config.host, config.insecure_plaintext)
        self.config = config
        # From flags or EDGEMESH_<FIELD> (e.g. --http-header-s, EDGEMESH_HTTP_HEADER_S), as every setting.
        self.timeouts = config.timeouts
        self.limits = config.limits
        self.api_key = config.api_key
        self.metrics = GatewayMetrics(CollectorRegistry())
        # The admin's policy and keys are read before the slow parts: a wrong file fails at once.
        self.api_keys = ApiKeys(config.api_key, config.api_keys_file, self.metrics)
        self.policy = GatewayPolicy.from_flags(config.system_prompt_file, config.deny_pattern, self.metrics)
        self.cluster_key = resolve_cluster_key(config.cluster_key)
        self.started_at = time.time()
        self.model_path = model_path
        self.model_name = model_path.stem
        self.model_aliases = parse_aliases(config.model_alias, self.model_name)
        self.cors_origins = parse_origins(config.cors_origin)
        self.model_sha = ModelSha(file_sha256(model_path))
        self.allowed = AllowedModels(config.allowed_models)
        self.allowed.check(self.model_sha, f"--model {model_path}")  # its tokenizer and template too
        if self.allowed.restricted:
            log.info("approved models (--allow-model): %s", self.allowed.describe())
        self.provenance = provenance(model_path, self.model_sha)
        self.tokenizer = Tokenizer.load(model_path, TemplateBudget.of(self.timeouts, self.limits))
        summary = inspect_gguf(model_path)
        self.n_layers = summary.n_layers
        self.summary = summary  # what /api/tags and /api/show describe the model with
        self.membership = Membership(self.cluster_key, self.timeouts, self.limits, on_change=self._membership_changed,
                                     refuse=self._refusal)
        if config.activation_dtype not in ACTIVATION_DTYPES:
            raise ConfigError(f"--activation-dtype must be one of {', '.join(ACTIVATION_DTYPES)}, "
                              f"not {config.activation_dtype!r}")
        self.scheduler = Scheduler(self.membership, self.model_sha, self.metrics, self.timeouts,
                                   config.activation_dtype)
        if config.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {config.strategy!r}")
        if config.stages < 0:
            raise ConfigError(f"--stages must be 0 (automatic) or a positive count, not {config.stages}")
        self.controller = PlacementController(
            self.membership, model_profile(model_path, self.model_sha), self.metrics,
            ControllerSettings(strategy=config.strategy, stages=config.stages, acting=config.placement))
        self.scheduler.replanner = self.controller
        self.cloud_up = False
        self.cloud = self._make_cloud(config)
        self.completions = Completions(self.scheduler, self.tokenizer, self.model_name, self.metrics, self.cloud,
                                       config.policy, self.policy, aliases=self.model_aliases)
        self.embeddings = Embeddings(self.scheduler, self.tokenizer, self.model_name, summary.n_embd, self.metrics,
                                     self.limits, self.policy, aliases=self.model_aliases)
        self._browser: Browser | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._exported_nodes: set[tuple[str, str]] = set()

    def _make_cloud(self, config: GatewayConfig) -> CloudUpstream | None:
        if config.policy not in POLICIES:
            raise ConfigError(f"--policy must be one of {', '.join(POLICIES)}, not {config.policy!r}")
        if not config.cloud_url:
            if config.policy != "local-only":
                raise ConfigError(f"--policy {config.policy} needs --cloud-url")
            return None
        from mesh.cloud import CircuitBreaker, CloudConfig, CloudUpstream

        cloud_config = CloudConfig.from_flags(config.cloud_url, config.cloud_model, config.cloud_key_env)
        breaker = CircuitBreaker(cloud_config.breaker, on_change=self._breaker_changed)
        self._breaker_changed(None, breaker.state)
        self._set_cloud_up(True)  # until a request or a probe says otherwise
        return CloudUpstream(cloud_config, breaker)

    def _set_cloud_up(self, up: bool) -> None:
        self.cloud_up = up
        self.metrics.cloud_up.set(1 if up else 0)

    def _breaker_changed(self, old: object, new: object) -> None:
        state = str(getattr(new, "value", new))
        for name in ("closed", "open", "half_open"):
            self.metrics.breaker_state.labels(name).set(1 if name == state else 0)
        if state == "open":
            self._set_cloud_up(False)
        elif state == "closed":
            self._set_cloud_up(True)
        if old is not None:
            log.warning("cloud circuit breaker: %s -> %s", getattr(old, "value", old), state)

    async def _probe_cloud(self) -> None:
        """Keep edgemesh_cloud_up true to the cloud's health even when no request goes there."""
        assert self.cloud is not None
        while True:
            await asyncio.sleep(CLOUD_PROBE_S)
            self._set_cloud_up(await self.cloud.probe())

    def add_peer(self, peer: Peer) -> None:
        self.membership.add(peer)

    def _membership_changed(self, what: str) -> None:
        self.controller.poke(what)

    def _refusal(self, info: NodeInfo) -> str:
        """Why a node must not be planned onto nor routed to: it holds a model not in --allow-model."""
        held = {m.sha256: m.name for m in (*info.models, *info.files)}
        held.update((s.model_sha256, s.model_sha256[:12]) for s in info.stages if s.model_sha256 not in held)
        others = sorted(f"{name[:80]} ({sha[:64]})" for sha, name in held.items() if not self.allowed.permits(sha))
        if not others:
            return ""
        return f"holds {', '.join(others[:4])}, not in the gateway's --allow-model"

    async def start(self) -> None:
        for peer in static_peers(self.config.peer):
            self.add_peer(peer)
        if self.config.discovery:
            self._browser = Browser(cluster_hash(self.cluster_key), self.add_peer,
                                    browse_interfaces(self.config.host))
            await self._browser.start()
        if self.cloud is not None:
            self._probe_task = asyncio.create_task(self._probe_cloud())
        self.controller.start()

    async def stop(self) -> None:
        self.completions.close()
        await self.controller.stop()
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
        if self.cloud is not None:
            await self.cloud.close()
        if self._browser is not None:
            await self._browser.stop()
        await self.membership.stop()

    # ------------------------------------------------------------------ views

    def _node_view(self, member: Member) -> dict[str, Any]:
        info = member.info
        holds = [m for m in info.models if m.sha256 == self.model_sha] if info else []
        stages = sorted((s for s in info.stages if s.model_sha256 == self.model_sha),
                        key=lambda s: s.layers.first) if info else []
        return {
            "id": info.node_id if info else None,
            "name": info.name if info else member.address,
            "address": member.address,
            "state": member.state.value,
            "since": member.since,
            "reason": member.reason,
            "pid": info.pid if info else None,
            "memory_total": info.memory_total if info else None,
            "memory_free": info.memory_free if info else None,
            "memory_limit": info.memory_limit if info else None,
            "threads": info.threads if info else None,
            "decode_tokens_per_second": round(info.decode_tokens_per_second, 1) if info else None,
            "models": [{"name": m.name, "sha256": m.sha256, "n_layers": m.n_layers, "bytes": m.file_bytes}
                       for m in (info.models if info else ())],
            "role": "replica" if holds else ("stage" if stages else ("spare" if info and info.files else "idle")),
            "layers": [0, holds[0].n_layers] if holds else (stages[0].layers.as_list() if stages else None),
            "stages": [{"layers": s.layers.as_list(), "slots": s.slots, "weight_bytes": s.weight_bytes,
                        "kv_cache_bytes": s.kv_cache_bytes, "compute_bytes": s.compute_bytes} for s in stages],
            "files": [{"name": m.name, "sha256": m.sha256, "n_layers": m.n_layers, "bytes": m.file_bytes}
                      for m in (info.files if info else ())],
            "in_flight": self.scheduler.outstanding(info.node_id) if info else 0,
            "capacity": info.capacity if info else 0,
            "version": info.version if info else None,
            "memory_budget": info.memory_budget if info else None,
            "speed_source": info.speed_source if info else None,
            "stage_only": info.stage_only if info else None,
            "role_reason": self._role_reason(member),
            "step_tokens_per_second": round(info.step_tokens_per_second, 1) if info else None,
            "allowed_models": list(info.allowed_models) if info else None,  # [] = any model
            "activity": ({"what": info.activity, "progress": info.activity_progress if info.activity_progress >= 0
                          else None} if info and info.activity else None),
        }

    def _role_reason(self, member: Member) -> str:
        """Why the node has its role, in words: the controller's reason, or why it is not planned."""
        if member.info is None or member.state != MemberState.READY:
            return member.reason or f"not planned while {member.state.value}"
        roles = dict(self.controller.decision.roles) if self.controller.decision else {}
        return roles.get(member.info.node_id, "")

    def cluster_view(self) -> dict[str, Any]:
        return {
            "model": {"name": self.model_name, "sha256": self.model_sha, "n_layers": self.n_layers,
                      "provenance": self.provenance.as_json()},
            "allowed_models": self.allowed_view(),
            "nodes": [self._node_view(m) for m in sorted(self.membership.members(), key=lambda m: m.address)],
            "routing": self.routing_view(),
            "last_failover": self.metrics.last_failover,
            "placements": [
                {"kind": p.kind, "model": p.model_name,
                 "stages": [{"node": s.node_id, "name": self.membership.name_of(s.node_id),
                             "layers": s.layers.as_list()} for s in p.stages]}
                for p in self.scheduler.placements()
            ],
            "placement": self.controller.view(self.scheduler.context_length),
        }

    def allowed_view(self) -> dict[str, Any]:
        """The gateway's approved models: any (no --allow-model), or the list."""
        return {"any": not self.allowed.restricted, "sha256": list(self.allowed.shas),
                "text": self.allowed.describe()}

    def prometheus_targets(self) -> list[dict[str, Any]]:
        """Prometheus HTTP service discovery: every node the gateway knows, by its metrics port."""
        targets = []
        for m in sorted(self.membership.members(), key=lambda m: m.address):
            if m.info is None or not m.info.metrics_port:
                continue
            host = m.address.rsplit(":", 1)[0]
            targets.append({"targets": [f"{host}:{m.info.metrics_port}"],
                            "labels": {"node_id": m.info.node_id, "name": m.info.name, "state": m.state.value}})
        return targets

    def routing_view(self) -> dict[str, Any]:
        cloud = None
        if self.cloud is not None:
            state = self.cloud.breaker.state
            cloud = {"url": self.config.cloud_url, "breaker": str(getattr(state, "value", state)),
                     "up": self.cloud_up}
        return {"policy": self.completions.policy, "cloud": cloud, "last_route": self.completions.last_route}

    def refresh_gauges(self) -> None:
        members = self.membership.members()
        for state in MemberState:
            self.metrics.mesh_nodes.labels(state.value).set(sum(1 for m in members if m.state == state))
        current: set[tuple[str, str]] = set()
        for m in members:
            if m.info is not None:
                current.add((m.info.node_id, m.info.name))
                self.metrics.mesh_node_up.labels(m.info.node_id, m.info.name).set(
                    1 if m.state == MemberState.READY else 0)
        # A restarted node has a new id: drop the old id's series instead of exporting a 0 forever.
        for node_id, name in self._exported_nodes - current:
            self.metrics.mesh_node_up.remove(node_id, name)
            if node_id not in {n for n, _ in current}:
                try:
                    self.metrics.node_in_flight.remove(node_id)
                except KeyError:  # never had a request
                    pass
        self._exported_nodes = current
        placements = self.scheduler.placements()
        for kind in ("replica", "pipeline"):
            self.metrics.placements.labels(kind).set(sum(1 for p in placements if p.kind == kind))

