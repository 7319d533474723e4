"""Write the Grafana dashboards in grafana/dashboards from the panel lists below (the one
place they are defined; a test fails when the JSON files are stale).

Usage: python scripts/gen_dashboards.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

Panel = tuple[str, str, list[tuple[str, str]], str]  # (title, kind, [(expr, legend)], unit)

OVERVIEW: list[Panel] = [
    ("Nodes up", "stat", [("sum(edgemesh_mesh_node_up)", "ready nodes")], "none"),
    ("Cloud up", "stat", [("max(edgemesh_cloud_up)", "cloud")], "none"),
    ("Placements", "stat", [("sum by (kind) (edgemesh_placements)", "{{kind}}")], "none"),
    ("In-flight requests", "stat", [("sum(edgemesh_in_flight_requests)", "in flight")], "none"),
    ("Route split (requests/s)", "timeseries",
     [("sum by (route) (rate(edgemesh_requests_total[$__rate_interval]))", "{{route}}")], "reqps"),
    ("Requests by status", "timeseries",
     [("sum by (status) (rate(edgemesh_requests_total[$__rate_interval]))", "{{status}}")], "reqps"),
    ("Time to first token", "timeseries",
     [(f"histogram_quantile({q}, sum by (le) (rate(edgemesh_time_to_first_token_seconds_bucket"
       f"[$__rate_interval])))", f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)], "s"),
    ("Tokens per second", "timeseries",
     [("sum by (route) (rate(edgemesh_tokens_generated_total[$__rate_interval]))", "{{route}}")], "none"),
    ("Inter-token latency", "timeseries",
     [(f"histogram_quantile({q}, sum by (le) (rate(edgemesh_inter_token_latency_seconds_bucket"
       f"[$__rate_interval])))", f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)], "s"),
    ("Queue depth", "timeseries", [("sum(edgemesh_queue_depth)", "queued")], "none"),
    ("Failovers", "timeseries",
     [("sum by (from, to, reason) (increase(edgemesh_failovers_total[$__rate_interval]))",
       "{{from}} → {{to}} ({{reason}})")], "none"),
    ("Circuit breaker", "timeseries", [("max by (state) (edgemesh_cloud_breaker_state)", "{{state}}")], "none"),
    ("Re-plans and replayed tokens", "timeseries",
     [("sum by (reason) (increase(edgemesh_replans_total[$__rate_interval]))", "re-plan {{reason}}"),
      ("sum(increase(edgemesh_replayed_tokens_total[$__rate_interval]))", "replayed tokens")], "none"),
    ("Failover recovery", "timeseries",
     [("histogram_quantile(0.95, sum by (le) (rate(edgemesh_failover_recover_seconds_bucket"
       "[$__rate_interval])))", "p95 recover"),
      ("histogram_quantile(0.95, sum by (le) (rate(edgemesh_failover_detect_seconds_bucket"
       "[$__rate_interval])))", "p95 detect")], "s"),
    ("Nodes by state", "timeseries", [("sum by (state) (edgemesh_mesh_nodes)", "{{state}}")], "none"),
]

NODE_SELECTOR = '{instance=~"$instance"}'
NODE: list[Panel] = [
    ("Node up", "stat", [(f"edgemesh_node_up{NODE_SELECTOR}", "{{instance}}")], "none"),
    ("Layers held", "stat", [(f"edgemesh_node_layers_held{NODE_SELECTOR}", "{{instance}}")], "none"),
    ("KV slots in use", "stat", [(f"edgemesh_node_kv_slots_in_use{NODE_SELECTOR}", "{{instance}}")], "none"),
    ("Stage sessions", "stat", [(f"edgemesh_node_stage_sessions{NODE_SELECTOR}", "{{instance}}")], "none"),
    ("Memory", "timeseries", [(f"edgemesh_node_memory_bytes{NODE_SELECTOR}", "{{instance}} {{kind}}")], "bytes"),
    ("Stage memory", "timeseries",
     [(f"edgemesh_node_stage_memory_bytes{NODE_SELECTOR}", "{{instance}} {{kind}}")], "bytes"),
    ("Stage step latency", "timeseries",
     [(f"histogram_quantile({q}, sum by (le, kind) (rate(edgemesh_node_stage_step_seconds_bucket"
       f"{NODE_SELECTOR}[$__rate_interval])))", f"p{int(q * 100)} {{{{kind}}}}") for q in (0.5, 0.95)], "s"),
    ("RPC latency (p95)", "timeseries",
     [("histogram_quantile(0.95, sum by (le, method) (rate(edgemesh_node_rpc_duration_seconds_bucket"
       f"{NODE_SELECTOR}[$__rate_interval])))", "{{method}}")], "s"),
    ("Bytes in / out", "timeseries",
     [(f"rate(edgemesh_node_bytes_received_total{NODE_SELECTOR}[$__rate_interval])", "in {{instance}}"),
      (f"rate(edgemesh_node_bytes_sent_total{NODE_SELECTOR}[$__rate_interval])", "out {{instance}}")], "Bps"),
    ("Errors by code", "timeseries",
     [(f"sum by (method, code) (rate(edgemesh_node_rpc_errors_total{NODE_SELECTOR}[$__rate_interval]))",
       "{{method}} {{code}}")], "reqps"),
    ("Auth failures", "timeseries",
     [(f"rate(edgemesh_node_auth_failures_total{NODE_SELECTOR}[$__rate_interval])", "{{instance}}")], "reqps"),
    ("Tokens per second", "timeseries",
     [(f"rate(edgemesh_node_tokens_generated_total{NODE_SELECTOR}[$__rate_interval])", "{{instance}}")], "none"),
    ("Requests in flight", "timeseries",
     [(f"edgemesh_node_in_flight_requests{NODE_SELECTOR}", "{{instance}}")], "none"),
]


def _panel(index: int, spec: Panel, y: int) -> dict[str, Any]:
    title, kind, targets, unit = spec
    width = 6 if kind == "stat" else 12
    return {
        "id": index + 1, "type": kind, "title": title, "datasource": DATASOURCE,
        "gridPos": {"h": 4 if kind == "stat" else 8, "w": width, "x": 0, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {} if kind == "stat" else {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
    }


def _layout(specs: list[Panel]) -> list[dict[str, Any]]:
    """Stats four to a row, graphs two to a row."""
    panels = []
    x = y = 0
    row_height = 0
    for index, spec in enumerate(specs):
        panel = _panel(index, spec, y)
        w, h = panel["gridPos"]["w"], panel["gridPos"]["h"]
        if x + w > 24:
            x, y = 0, y + row_height
            row_height = 0
        panel["gridPos"].update({"x": x, "y": y})
        x += w
        row_height = max(row_height, h)
        panels.append(panel)
    return panels


def dashboard(uid: str, title: str, specs: list[Panel], variables: list[dict[str, Any]],
              annotations: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "tags": ["edgemesh"], "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "timezone": "browser",
        "templating": {"list": variables},
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}, *annotations]},
        "panels": _layout(specs),
    }


def overview() -> dict[str, Any]:
    failovers = {"name": "Failovers", "enable": True, "iconColor": "red", "datasource": DATASOURCE,
                 "expr": "sum by (from, to, reason) (changes(edgemesh_failovers_total[1m])) > 0",
                 "step": "30s", "titleFormat": "failover {{from}} → {{to}}", "textFormat": "{{reason}}"}
    return dashboard("edgemesh-overview", "EdgeMesh overview", OVERVIEW, [], [failovers])


def node() -> dict[str, Any]:
    instance = {"name": "instance", "label": "node", "type": "query", "datasource": DATASOURCE,
                "query": {"query": "label_values(edgemesh_node_up, instance)", "refId": "instance"},
                "definition": "label_values(edgemesh_node_up, instance)", "refresh": 2, "includeAll": True,
                "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}}
    return dashboard("edgemesh-node", "EdgeMesh node", NODE, [instance], [])


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, board in (("edgemesh-overview.json", overview()), ("edgemesh-node.json", node())):
        path = out / name
        path.write_text(json.dumps(board, indent=2, ensure_ascii=False) + "\n")
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "grafana" / "dashboards")
    for path in write(parser.parse_args().out):
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
