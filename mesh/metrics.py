"""The whole metric catalogue, in one place. Every name starts with `edgemesh_`.

Each process builds its metrics on its own CollectorRegistry, so several components
can live in one test process without clashing. Label values are bounded: status codes,
routes, node ids of the mesh, RPC method names, never request ids or free text.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 5 ms (one decode step of a small model) to 2 minutes (a long prefill).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_GAP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class NodeMetrics:
    """Exported by every node on its --metrics-port."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.up = Gauge("edgemesh_node_up", "1 while the node serves, 0 while it drains", registry=registry)
        self.info = Gauge("edgemesh_node_info", "Constant 1, labelled with the node's identity",
                          ["node_id", "name", "version"], registry=registry)
        self.memory = Gauge("edgemesh_node_memory_bytes", "Device memory: total, free, and the node's limit",
                            ["kind"], registry=registry)
        self.role = Gauge("edgemesh_node_role", "1 for each role the node holds (replica or stage)",
                          ["role"], registry=registry)
        self.layers_held = Gauge("edgemesh_node_layers_held", "Transformer layers this node holds",
                                 registry=registry)
        self.requests = Counter("edgemesh_node_requests_total", "Generation requests by outcome",
                                ["status"], registry=registry)
        self.tokens = Counter("edgemesh_node_tokens_generated_total", "Tokens generated", registry=registry)
        self.prompt_tokens = Counter("edgemesh_node_prompt_tokens_total", "Prompt tokens received",
                                     registry=registry)
        self.in_flight = Gauge("edgemesh_node_in_flight_requests", "Requests running or queued",
                               registry=registry)
        self.slots_in_use = Gauge("edgemesh_node_kv_slots_in_use", "KV cache slots holding a session",
                                  registry=registry)
        self.time_to_first_token = Histogram("edgemesh_node_time_to_first_token_seconds",
                                             "From request arrival to its first token, on the node",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.tokens_per_second = Gauge("edgemesh_node_decode_tokens_per_second",
                                       "Decode speed of the last finished request", registry=registry)
        self.rpc_duration = Histogram("edgemesh_node_rpc_duration_seconds", "Duration of RPCs by method",
                                      ["method"], buckets=LATENCY_BUCKETS, registry=registry)
        self.rpc_errors = Counter("edgemesh_node_rpc_errors_total", "RPCs that ended in an error, by code",
                                  ["method", "code"], registry=registry)
        self.auth_failures = Counter("edgemesh_node_auth_failures_total",
                                     "Calls refused for a missing or wrong cluster key", registry=registry)
        self.bytes_in = Counter("edgemesh_node_bytes_received_total", "Payload bytes received in RPCs",
                                registry=registry)
        self.bytes_out = Counter("edgemesh_node_bytes_sent_total", "Payload bytes sent in RPCs",
                                 registry=registry)
        self.pipeline_bytes = Counter("edgemesh_node_pipeline_bytes_total",
                                      "Hidden-state bytes this node sent to the next stage of a pipeline, as encoded "
                                      "on the wire, by step kind (prefill or decode) and dtype (a ring's stages count "
                                      "their own hop; a hub's head counts every hop)",
                                      ["kind", "dtype"], registry=registry)
        self.pipeline_sends = Counter("edgemesh_node_pipeline_sends_total",
                                      "Hidden-state sends to the next stage (one per step and hop), by step kind and "
                                      "dtype: bytes per token of a hop is pipeline_bytes / pipeline_sends",
                                      ["kind", "dtype"], registry=registry)
        self.stage_step = Histogram("edgemesh_node_stage_step_seconds",
                                    "Compute time of one pipeline-stage step, by kind (prefill or decode)",
                                    ["kind"], buckets=LATENCY_BUCKETS, registry=registry)
        self.stage_sessions = Gauge("edgemesh_node_stage_sessions", "Pipeline sessions holding a KV slot",
                                    registry=registry)
        self.decode_batch_rows = Histogram("edgemesh_node_decode_batch_rows",
                                           "Replica sessions decoded together in one step (one llama_decode)",
                                           buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=registry)
        self.stage_memory = Gauge("edgemesh_node_stage_memory_bytes",
                                  "Memory of the loaded pipeline stage, by kind (weights, kv_cache, compute)",
                                  ["kind"], registry=registry)

    def count_hidden_sent(self, nbytes: int, kind: str, dtype: str) -> None:
        """One send of hidden states to the next stage: its wire bytes, step kind and dtype."""
        self.pipeline_bytes.labels(kind, dtype).inc(nbytes)
        self.pipeline_sends.labels(kind, dtype).inc()


class GatewayMetrics:
    """Exported by the gateway at /metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.last_failover: dict[str, object] | None = None  # shown by /api/cluster and `edgemesh status`
        self.requests = Counter("edgemesh_requests_total", "Completion requests by route and HTTP status",
                                ["route", "status"], registry=registry)
        self.tokens = Counter("edgemesh_tokens_generated_total", "Tokens streamed to clients, by route",
                              ["route"], registry=registry)
        self.prompt_tokens = Counter("edgemesh_prompt_tokens_total", "Prompt tokens of served requests",
                                     ["route"], registry=registry)
        self.time_to_first_token = Histogram("edgemesh_time_to_first_token_seconds",
                                             "From request arrival to the first token sent to the client",
                                             ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token = Histogram("edgemesh_inter_token_latency_seconds",
                                     "Gap between consecutive tokens sent to the client",
                                     ["route"], buckets=TOKEN_GAP_BUCKETS, registry=registry)
        self.duration = Histogram("edgemesh_request_duration_seconds", "Whole request duration",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge("edgemesh_in_flight_requests", "Requests being served", registry=registry)
        self.queue_depth = Gauge("edgemesh_queue_depth", "Requests admitted and waiting for their first token",
                                 registry=registry)
        self.queued = Gauge("edgemesh_admission_queued_requests", "Requests waiting in the gateway's queue because "
                            "every placement was full (a pipeline's stages queue nothing themselves)",
                            registry=registry)
        self.queue_wait = Histogram("edgemesh_admission_queue_wait_seconds", "How long a request that found every "
                                    "placement full waited in the gateway's queue", buckets=LATENCY_BUCKETS,
                                    registry=registry)
        self.retries = Counter("edgemesh_retries_total",
                               "Requests moved to another node before their first token, by reason",
                               ["reason"], registry=registry)
        self.rejected = Counter("edgemesh_rejected_total", "Requests refused before any work, by reason",
                                ["reason"], registry=registry)
        self.mesh_node_up = Gauge("edgemesh_mesh_node_up", "1 per node the gateway sees as ready, else 0",
                                  ["node_id", "name"], registry=registry)
        self.mesh_nodes = Gauge("edgemesh_mesh_nodes", "Nodes known to the gateway, by state",
                                ["state"], registry=registry)
        self.node_in_flight = Gauge("edgemesh_mesh_node_in_flight", "Requests the gateway has on each node",
                                    ["node_id"], registry=registry)
        self.placements = Gauge("edgemesh_placements", "Placements the scheduler can route to, by kind",
                                ["kind"], registry=registry)
        self.failovers = Counter("edgemesh_failovers_total",
                                 "Requests moved mid-answer, by what failed (from), what took over (to) and why",
                                 ["from", "to", "reason"], registry=registry)
        self.replans = Counter("edgemesh_replans_total", "Placement changes the controller loaded, by kind "
                               "(initial, extend, repair, replan, better, capacity)", ["reason"], registry=registry)
        self.placement_converge = Histogram(
            "edgemesh_placement_converge_seconds", "From a membership change (join, leave, failure) to the nodes "
            "holding the new placement", ["reason"], buckets=(0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300),
            registry=registry)
        self.failover_detect = Histogram("edgemesh_failover_detect_seconds",
                                         "From the last good token to a mid-stream failure surfacing",
                                         buckets=LATENCY_BUCKETS, registry=registry)
        self.failover_recover = Histogram("edgemesh_failover_recover_seconds",
                                          "From a mid-stream failure to the first token of the replayed stream "
                                          "(re-plan and replay included)", buckets=LATENCY_BUCKETS,
                                          registry=registry)
        self.replayed_tokens = Counter("edgemesh_replayed_tokens_total",
                                       "Tokens replayed into a new placement after a failover", registry=registry)
        self.cloud_up = Gauge("edgemesh_cloud_up", "1 while the cloud upstream answers, 0 when it fails "
                              "(stays 0 when no cloud is configured)", registry=registry)
        self.breaker_state = Gauge("edgemesh_cloud_breaker_state",
                                   "1 for the circuit breaker's current state (closed, open, half_open)",
                                   ["state"], registry=registry)
        # The admin's policy (mesh/gateway/policy.py, api_keys.py). Labels are rule numbers and
        # key names from the admin's own flags and file, never keys or request text.
        self.policy_blocks = Counter("edgemesh_gateway_policy_blocks_total",
                                     "Prompts refused and answers stopped by a deny pattern, by its number "
                                     "(rule) and where it matched (prompt or answer)", ["rule", "where"],
                                     registry=registry)
        self.requests_by_key = Counter("edgemesh_gateway_requests_by_key_total",
                                       "Completion requests by the name of the API key they came with",
                                       ["key_name"], registry=registry)
        self.tokens_by_key = Counter("edgemesh_gateway_tokens_by_key_total",
                                     "Tokens of served answers by API key name and kind (prompt or completion)",
                                     ["key_name", "kind"], registry=registry)
        self.api_keys_reload_errors = Counter("edgemesh_gateway_api_keys_reload_errors_total",
                                              "Changes of the API keys file that could not be loaded (the "
                                              "previous keys stayed in force)", registry=registry)

    def failover(self, source: str, target: str, reason: str, detail: str = "") -> None:
        """Count a failover and remember it as the last one."""
        self.failovers.labels(source, target, reason).inc()
        self.last_failover = {"from": source, "to": target, "reason": reason, "detail": detail, "at": time.time()}
