"""Write the Grafana dashboards in grafana/dashboards from the panel lists below (the one
place they are defined; a test fails when the JSON files are stale).

Every query names its datasource by the fixed uid `prometheus` (grafana/provisioning/
datasources/prometheus.yml), so the JSON works both provisioned and imported by hand.

Nodes are shown by name. Node series carry `name` (and `node_id`) as target labels, because
deploy/prometheus.yml finds the nodes through the gateway's HTTP service discovery
(/api/prometheus/targets); the gateway's own per-node series are joined to the name by their
node_id. Hand-written targets need a `name` label to show up on the node dashboard.

Usage: python scripts/gen_dashboards.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # "stat" or "timeseries"
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "none"
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # merged over the kind's defaults
    mappings: list[dict[str, Any]] = field(default_factory=list)
    no_value: str = ""


def quantiles(metric: str, by: str, legend: str, selector: str = "", qs: tuple[float, ...] = QUANTILES
              ) -> list[tuple[str, str]]:
    """histogram_quantile targets over `metric`_bucket, one per quantile."""
    group = f"{by}, le" if by else "le"
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{selector}[{RATE}])))",
             f"p{round(q * 100)}{legend}") for q in qs]


def values(*pairs: tuple[int, str, str]) -> list[dict[str, Any]]:
    """Value mappings: (value, text, colour)."""
    return [{"type": "value", "options": {str(v): {"text": text, "color": colour, "index": i}}}
            for i, (v, text, colour) in enumerate(pairs)]


UP_DOWN = values((0, "down", "red"), (1, "up", "green"))
SHOW_NAME = {"textMode": "name", "colorMode": "none", "graphMode": "none"}



def born_or_increase(series: str) -> str:
    """A labelled counter (or histogram bucket) is born at its first inc() with the value 1
    already, so increase() alone never sees the first event of a kind after a start (the first
    failover; the initial placement, which happens once per gateway): series born inside the
    window count whole, older ones by their increase."""
    return f"({series} unless {series} offset {RATE}) or increase({series}[{RATE}])"


FAILOVERS = born_or_increase("edgemesh_failovers_total")
REPLANS = born_or_increase("edgemesh_replans_total")
# The gateway's per-node series carry node_id (and edgemesh_mesh_node_up also the name): join
# them to the name. max by (node_id, name) makes one series per node however many gateways.
BY_NAME = "* on(node_id) group_left(name) max by (node_id, name) (edgemesh_mesh_node_up)"


def converge_quantiles(qs: tuple[float, ...] = (0.5, 0.95)) -> list[tuple[str, str]]:
    """Convergence time of placement changes: rare events, so counted as they are born too."""
    buckets = born_or_increase("edgemesh_placement_converge_seconds_bucket")
    return [(f"histogram_quantile({q}, sum by (le) ({buckets}))", f"p{round(q * 100)}") for q in qs]

OVERVIEW: list[Panel] = [
    Panel("Nodes up", "stat",
          [("sum(edgemesh_mesh_node_up)", "ready"),
           ('sum(edgemesh_mesh_nodes{state=~"joining|ready|draining|down"})', "known")],
          description="Nodes the gateway sees as ready, and every node it follows (static peers and mDNS).",
          options={"textMode": "value_and_name"}),
    Panel("Cloud up", "stat", [("max(edgemesh_cloud_up) and on() group(edgemesh_cloud_breaker_state)", "cloud")],
          description="The cloud upstream's health; empty when the gateway has no --cloud-url.",
          mappings=UP_DOWN, no_value="no cloud", options={"colorMode": "background"}),
    Panel("Breaker", "stat", [("max by (state) (edgemesh_cloud_breaker_state) == 1", "{{state}}")],
          description="The cloud circuit breaker's current state.", options=SHOW_NAME, no_value="no cloud"),
    Panel("Placements", "stat", [("sum by (kind) (edgemesh_placements)", "{{kind}}")],
          description="Replicas and pipelines the scheduler can route to.", options={"textMode": "value_and_name"}),
    Panel("In-flight requests", "stat", [("sum(edgemesh_in_flight_requests)", "in flight")]),
    Panel("Queue depth", "stat", [("sum(edgemesh_queue_depth)", "queued")],
          description="Requests admitted and waiting for their first token."),
    Panel("Route split (requests/s)", "timeseries",
          [(f"sum by (route) (rate(edgemesh_requests_total[{RATE}]))", "{{route}}")], "reqps",
          description="Where answers come from: the mesh or the cloud."),
    Panel("Requests by status", "timeseries",
          [(f"sum by (status) (rate(edgemesh_requests_total[{RATE}]))", "{{status}}")], "reqps"),
    Panel("Time to first token", "timeseries",
          quantiles("edgemesh_time_to_first_token_seconds", "", ""), "s",
          description="Request arrival to the first token sent to the client (alert: p95 > 5 s for 5 m)."),
    Panel("Tokens per second", "timeseries",
          [(f"sum by (route) (rate(edgemesh_tokens_generated_total[{RATE}]))", "{{route}}")], "none",
          description="Tokens streamed to clients."),
    Panel("Inter-token latency", "timeseries",
          quantiles("edgemesh_inter_token_latency_seconds", "", ""), "s",
          description="Gap between consecutive tokens sent to the client."),
    Panel("Request duration", "timeseries", quantiles("edgemesh_request_duration_seconds", "", ""), "s"),
    Panel("Queue depth and in-flight requests", "timeseries",
          [("sum(edgemesh_queue_depth)", "queued"), ("sum(edgemesh_in_flight_requests)", "in flight")]),
    Panel("Requests per node (gateway view)", "timeseries",
          [(f"sum by (node_id) (edgemesh_mesh_node_in_flight) {BY_NAME}", "{{name}}")],
          description="Requests the gateway has on each node, by node name."),
    Panel("Nodes ready (gateway view)", "timeseries",
          [("max by (name) (edgemesh_mesh_node_up)", "{{name}}")],
          description="1 while the gateway sees the node as ready, 0 while it is down, draining or joining.",
          mappings=UP_DOWN),
    Panel("Failovers", "timeseries",
          [(f"sum by (from, to, reason) ({FAILOVERS})", "{{from}} → {{to}} ({{reason}})")], "none",
          description="Requests moved mid-answer, by what failed, what took over and why."),
    Panel("Circuit breaker", "timeseries", [("max by (state) (edgemesh_cloud_breaker_state)", "{{state}}")]),
    Panel("Retries and rejections", "timeseries",
          [(f"sum by (reason) (rate(edgemesh_retries_total[{RATE}]))", "retry {{reason}}"),
           (f"sum by (reason) (rate(edgemesh_rejected_total[{RATE}]))", "rejected {{reason}}")], "reqps"),
    Panel("Placement changes", "timeseries",
          [(f"sum by (reason) ({REPLANS})", "{{reason}}")], "none",
          description="Placements the controller loaded onto the nodes, by why: initial, extend (a node "
                      "joined), repair or replan (a node left or failed), better (a faster plan), capacity "
                      "(more placements). /api/cluster and the cluster page say what changed."),
    Panel("Placement convergence time", "timeseries", converge_quantiles(), "s",
          description="From the change that asked for a new placement (join, leave, failure) to the nodes "
                      "holding it, p50 and p95 of the changes in each interval."),
    Panel("Replayed tokens", "timeseries",
          [(f"sum(increase(edgemesh_replayed_tokens_total[{RATE}]))", "replayed tokens")],
          description="Tokens replayed into a new placement after a mid-stream failover."),
    Panel("Failover detection and recovery (p95)", "timeseries",
          quantiles("edgemesh_failover_detect_seconds", "", " detect", qs=(0.95,))
          + quantiles("edgemesh_failover_recover_seconds", "", " recover", qs=(0.95,)), "s"),
    Panel("Nodes by state", "timeseries", [("sum by (state) (edgemesh_mesh_nodes)", "{{state}}")]),
    Panel("Pipeline traffic", "timeseries",
          [(f"sum by (name) (rate(edgemesh_node_pipeline_bytes_total[{RATE}]))", "head {{name}}")],
          "Bps", description="Hidden-state bytes each pipeline head sent from one stage to the next."),
]

NODE = '{name=~"$node"}'
NODE_PANELS: list[Panel] = [
    Panel("Node up", "stat", [(f"edgemesh_node_up{NODE}", "{{name}}")],
          description="1 while the node serves, 0 while it drains.", mappings=values(
              (0, "draining", "orange"), (1, "up", "green"))),
    Panel("Scrape up", "stat", [('up{job="edgemesh-node", name=~"$node"}', "{{name}}")],
          description="Prometheus reaches the node's metrics port (the gateway lists the node, down or not).",
          mappings=UP_DOWN),
    Panel("Role", "stat", [(f"edgemesh_node_role{NODE} == 1", "{{name}}: {{role}}")], options=SHOW_NAME,
          description="What the gateway's placement controller gave the node; no value: a spare."),
    Panel("Layers held", "stat", [(f"edgemesh_node_layers_held{NODE}", "{{name}}")]),
    Panel("KV slots in use", "stat", [(f"edgemesh_node_kv_slots_in_use{NODE}", "{{name}}")]),
    Panel("Stage sessions", "stat", [(f"edgemesh_node_stage_sessions{NODE}", "{{name}}")]),
    Panel("Memory", "timeseries", [(f"edgemesh_node_memory_bytes{NODE}", "{{name}} {{kind}}")], "bytes",
          description="Device memory (total, free) and the node's limit."),
    Panel("Stage memory", "timeseries",
          [(f"edgemesh_node_stage_memory_bytes{NODE}", "{{name}} {{kind}}")], "bytes"),
    Panel("Stage step latency", "timeseries",
          quantiles("edgemesh_node_stage_step_seconds", "name, kind", " {{name}} {{kind}}", NODE), "s",
          description="Compute time of one pipeline-stage step (prefill, decode)."),
    Panel("RPC latency by method", "timeseries",
          quantiles("edgemesh_node_rpc_duration_seconds", "method", " {{method}}", NODE, qs=(0.5, 0.95)), "s"),
    Panel("RPCs by method", "timeseries",
          [(f"sum by (method) (rate(edgemesh_node_rpc_duration_seconds_count{NODE}[{RATE}]))", "{{method}}")],
          "reqps"),
    Panel("Loads and releases", "timeseries",
          [(f"sum by (name, method) (increase(edgemesh_node_rpc_duration_seconds_count"
            f'{{name=~"$node", method=~"LoadModel|LoadStage|ReleaseHolding"}}[{RATE}]))', "{{name}} {{method}}")],
          description="The placement controller's calls: load the whole model, load a layer range, release "
                      "what the plan no longer uses."),
    Panel("Errors by code", "timeseries",
          [(f"sum by (method, code) (rate(edgemesh_node_rpc_errors_total{NODE}[{RATE}]))", "{{method}} {{code}}")],
          "reqps"),
    Panel("Auth failures", "timeseries",
          [(f"rate(edgemesh_node_auth_failures_total{NODE}[{RATE}])", "{{name}}")], "reqps",
          description="Calls refused for a missing or wrong cluster key."),
    Panel("Bytes in / out", "timeseries",
          [(f"rate(edgemesh_node_bytes_received_total{NODE}[{RATE}])", "in {{name}}"),
           (f"rate(edgemesh_node_bytes_sent_total{NODE}[{RATE}])", "out {{name}}")], "Bps"),
    Panel("Tokens per second", "timeseries",
          [(f"rate(edgemesh_node_tokens_generated_total{NODE}[{RATE}])", "{{name}}"),
           (f"edgemesh_node_decode_tokens_per_second{NODE}", "{{name}} last request's decode speed")]),
    Panel("Requests by status", "timeseries",
          [(f"sum by (name, status) (rate(edgemesh_node_requests_total{NODE}[{RATE}]))",
            "{{name}} {{status}}")], "reqps"),
    Panel("Time to first token on the node", "timeseries",
          quantiles("edgemesh_node_time_to_first_token_seconds", "name", " {{name}}", NODE, (0.5, 0.95)),
          "s"),
    Panel("Requests in flight", "timeseries",
          [(f"edgemesh_node_in_flight_requests{NODE}", "{{name}}")]),
]


def _panel(panel_id: int, spec: Panel) -> dict[str, Any]:
    stat = spec.kind == "stat"
    defaults: dict[str, Any] = {"unit": spec.unit}
    if spec.mappings:
        defaults["mappings"] = spec.mappings
    if spec.no_value:
        defaults["noValue"] = spec.no_value
    options: dict[str, Any] = (
        {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value",
         "graphMode": "area", "textMode": "auto", "justifyMode": "auto", "orientation": "auto"}
        if stat else {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                      "tooltip": {"mode": "multi", "sort": "desc"}})
    options.update(spec.options)
    return {
        "id": panel_id, "type": spec.kind, "title": spec.title, "description": spec.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 4 if stat else 8, "w": 4 if stat else 12, "x": 0, "y": 0},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
                     "range": True, "instant": False} for i, (expr, legend) in enumerate(spec.targets)],
    }


def _layout(specs: list[Panel]) -> list[dict[str, Any]]:
    """Stats six to a row, graphs two to a row, left to right and top to bottom."""
    panels: list[dict[str, Any]] = []
    x = y = row_height = 0
    for index, spec in enumerate(specs):
        panel = _panel(index + 1, spec)
        w, h = panel["gridPos"]["w"], panel["gridPos"]["h"]
        if x + w > 24 or (panels and panels[-1]["gridPos"]["h"] != h):
            x, y, row_height = 0, y + row_height, 0
        panel["gridPos"].update({"x": x, "y": y})
        x += w
        row_height = max(row_height, h)
        panels.append(panel)
    return panels


def dashboard(uid: str, title: str, description: str, specs: list[Panel], variables: list[dict[str, Any]],
              annotations: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": None, "uid": uid, "title": title, "description": description, "tags": ["edgemesh"],
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "timezone": "browser",
        "links": [{"title": "EdgeMesh", "type": "dashboards", "tags": ["edgemesh"], "asDropdown": True,
                   "includeVars": False, "keepTime": True}],
        "templating": {"list": variables},
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}, *annotations]},
        "panels": _layout(specs),
    }


def overview() -> dict[str, Any]:
    failovers = {"name": "Failovers", "enable": True, "iconColor": "red", "datasource": DATASOURCE,
                 "expr": f"sum by (from, to, reason) ({FAILOVERS}) > 0", "step": "15s",
                 "titleFormat": "failover {{from}} → {{to}}", "textFormat": "{{reason}}", "tagKeys": "reason"}
    replans = {"name": "Placement changes", "enable": True, "iconColor": "purple", "datasource": DATASOURCE,
               "expr": f"sum by (reason) ({REPLANS}) > 0", "step": "15s",
               "titleFormat": "placement: {{reason}}", "textFormat": "the controller loaded a new placement",
               "tagKeys": "reason"}
    return dashboard("edgemesh-overview", "EdgeMesh overview",
                     "The mesh as the gateway sees it: nodes by name, cloud, routes, latency, failovers, "
                     "placement changes.", OVERVIEW, [], [failovers, replans])


def node() -> dict[str, Any]:
    query = 'label_values(up{job="edgemesh-node"}, name)'
    variable = {"name": "node", "label": "Node", "type": "query", "datasource": DATASOURCE,
                "description": "The nodes by name, as the gateway's service discovery lists them (down ones "
                               "too)",
                "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
                "definition": query, "refresh": 2, "sort": 1, "regex": "", "hide": 0, "includeAll": True,
                "multi": True, "options": [],  # no allValue: "All" is every listed node, never other targets
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}
    return dashboard("edgemesh-node", "EdgeMesh node",
                     "Per node: health, memory, layers, KV slots, stage steps, RPCs, bytes, errors.",
                     NODE_PANELS, [variable], [])


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, board in (("edgemesh-overview.json", overview()), ("edgemesh-node.json", node())):
        path = out / name
        path.write_text(json.dumps(board, indent=2, ensure_ascii=False) + "\n")
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "grafana" / "dashboards")
    for path in write(parser.parse_args().out):
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
