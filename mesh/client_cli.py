"""Terminal clients of a gateway: `edgemesh status` (a table of nodes) and `edgemesh chat`."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import httpx

from mesh.errors import EdgeMeshError, Unavailable
from mesh.provenance import provenance_from_json

CLIENT_TIMEOUT = httpx.Timeout(connect=5.0, read=300.0, write=30.0, pool=5.0)


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _mb(value: Any) -> str:
    return f"{value / 2**20:,.0f} MiB" if isinstance(value, (int, float)) else "-"


def fetch_cluster(url: str, api_key: str) -> dict[str, Any]:
    try:
        response = httpx.get(f"{url.rstrip('/')}/api/cluster", headers=_headers(api_key), timeout=CLIENT_TIMEOUT)
    except httpx.HTTPError as exc:
        raise Unavailable(f"cannot reach the gateway at {url}: {exc}") from exc
    if response.status_code != 200:
        raise EdgeMeshError(f"gateway answered {response.status_code}: {response.text[:200]}")
    data: dict[str, Any] = response.json()
    return data


def format_status(cluster: dict[str, Any]) -> str:
    rows = [("NAME", "ID", "STATE", "ROLE", "LAYERS", "ADDRESS", "PID", "MEM FREE", "MEM TOTAL", "BUSY")]
    for node in cluster.get("nodes", []):
        layers = node.get("layers")
        rows.append((
            str(node.get("name") or "-"), str(node.get("id") or "-"), str(node.get("state")),
            str(node.get("role") or "-"), f"{layers[0]}-{layers[1]}" if layers else "-",
            str(node.get("address")), str(node.get("pid") or "-"), _mb(node.get("memory_free")),
            _mb(node.get("memory_total")), f"{node.get('in_flight', 0)}/{node.get('capacity', 0)}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    model = cluster.get("model", {})
    lines.insert(0, f"model {model.get('name', '?')}  ({len(rows) - 1} node(s))")
    allowed = cluster.get("allowed_models") or {}
    lines.insert(1, "models: any (no --allow-model)" if allowed.get("any", True) else
                 "models: only " + ", ".join(str(sha) for sha in allowed.get("sha256", [])))
    provenance = model.get("provenance")
    if provenance:
        lines.insert(1, f"provenance: {provenance_from_json(provenance).summary()}")
    for placement in cluster.get("placements", []):
        stages = ", ".join(f"{s.get('name') or s['node']}[{s['layers'][0]}-{s['layers'][1]}]"
                           for s in placement.get("stages", []))
        lines.append(f"placement {placement.get('kind')}: {stages}")
    for node in cluster.get("nodes", []):  # role_reason is the controller's reason for the node's role
        if node.get("role_reason"):
            lines.append(f"  {node.get('name')}: {node['role_reason']}")
    routing = cluster.get("routing") or {}
    cloud = routing.get("cloud")
    cloud_text = "none configured" if not cloud else \
        f"{'up' if cloud.get('up') else 'DOWN'}, breaker {cloud.get('breaker')} ({cloud.get('url')})"
    lines.append(f"routing {routing.get('policy', 'local-only')}; cloud: {cloud_text}; "
                 f"last route: {routing.get('last_route') or '-'}")
    last = cluster.get("last_failover")
    if last:
        when = time.strftime("%H:%M:%S", time.localtime(float(last.get("at", 0))))
        lines.append(f"last failover {when}: {last.get('from')} -> {last.get('to')} ({last.get('reason')}) "
                     f"{last.get('detail', '')}".rstrip())
    else:
        lines.append("last failover: none")
    return "\n".join(lines) + "\n"


def print_status(url: str, api_key: str) -> None:
    sys.stdout.write(format_status(fetch_cluster(url, api_key)))


def stream_chat(url: str, api_key: str, messages: list[dict[str, str]], *, max_tokens: int,
                temperature: float) -> tuple[str, str]:
    """Send the conversation, echo the answer as it streams; returns (answer, route)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, "stream": True}
    pieces: list[str] = []
    with httpx.stream("POST", f"{url.rstrip('/')}/v1/chat/completions", json=body, headers=_headers(api_key),
                      timeout=CLIENT_TIMEOUT) as response:
        if response.status_code != 200:
            response.read()
            raise EdgeMeshError(f"gateway answered {response.status_code}: {response.text[:300]}")
        route = response.headers.get("x-edgemesh-route", "?")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise EdgeMeshError(chunk["error"].get("message", "stream failed"))
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content") or ""
                pieces.append(text)
                sys.stdout.write(text)
                sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces), route


def chat_loop(url: str, api_key: str, *, max_tokens: int, temperature: float, system: str) -> None:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    sys.stdout.write(f"chatting with {url} (empty line or Ctrl-D to quit)\n")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        try:
            answer, route = stream_chat(url, api_key, messages, max_tokens=max_tokens, temperature=temperature)
        except (EdgeMeshError, httpx.HTTPError) as exc:
            sys.stdout.write(f"error: {exc}\n")
            messages.pop()
            continue
        sys.stdout.write(f"  [served by {route}]\n")
        messages.append({"role": "assistant", "content": answer})
