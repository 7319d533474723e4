"""A real Prometheus scrapes a live mesh: every dashboard query evaluates, the core panels
have data, the alert rules load, and CloudDown fires during a cloud outage and resolves
after it."""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, Launcher, gateway_url, wait_for_nodes

pytestmark = pytest.mark.slow

PROMETHEUS = shutil.which("prometheus")
CORE_PANELS = {"Nodes up", "Time to first token", "Tokens per second", "Node up", "Memory", "Route split (requests/s)"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Models(http.server.BaseHTTPRequestHandler):
    """The smallest OpenAI-compatible answer the gateway's cloud health probe needs."""

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "stand-in", "object": "model"}]}).encode()
        self.send_response(200 if self.path.endswith("/models") else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def query(prom: str, expr: str) -> dict[str, Any]:
    reply: dict[str, Any] = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
    return reply


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Prometheus on loopback, configured by the test through the yielded config path."""
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (Debian package prometheus; `make test` installs it)")
    config = tmp_path / "prometheus.yml"
    yield f"127.0.0.1:{free_port()}", config


def start_prometheus(listen: str, config: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    assert PROMETHEUS is not None
    with open(tmp_path / "prometheus.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--web.listen-address={listen}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", "--web.enable-lifecycle"],
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{listen}/-/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("prometheus did not become ready:\n" + (tmp_path / "prometheus.log").read_text()[-3000:])


def test_dashboards_and_alerts_against_a_live_mesh(launcher: Launcher, default_model: Path, tmp_path: Path,
                                                   prometheus: tuple[str, Path]) -> None:
    listen, config = prometheus
    cloud_port = free_port()  # nothing listens here yet: the cloud starts out down
    nodes = [launcher.node(f"node-{i}", default_model) for i in (1, 2)]
    peers = [a for n in nodes for a in ("--peer", f"127.0.0.1:{n.ready[1]}")]
    gateway = launcher.gateway("gateway", default_model, "--no-discovery", *peers, "--policy", "cloud-first",
                               "--cloud-url", f"http://127.0.0.1:{cloud_port}/v1")
    url = gateway_url(gateway)
    wait_for_nodes(url, 2)
    for i in range(4):
        assert httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 8}).status_code == 200

    # The real alert rules, with their `for:` shortened so the test need not wait minutes.
    rules = (REPO / "deploy" / "alerts.yml").read_text()
    for duration in ("1m", "2m", "5m"):
        rules = rules.replace(f"for: {duration}", "for: 2s")
    (tmp_path / "alerts.yml").write_text(rules)
    gateway_target = url.removeprefix("http://")
    node_targets = ", ".join(f'"127.0.0.1:{n.ready[2]}"' for n in nodes)
    config.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [alerts.yml]
scrape_configs:
  - job_name: edgemesh-node
    static_configs: [{{targets: [{node_targets}]}}]
  - job_name: edgemesh-gateway
    static_configs: [{{targets: ["{gateway_target}"]}}]
""")
    proc = start_prometheus(listen, config, tmp_path)
    prom = f"http://{listen}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            targets = httpx.get(f"{prom}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
            if len(targets) == 3 and all(t["health"] == "up" for t in targets):
                break
            time.sleep(0.5)
        assert all(t["health"] == "up" for t in targets), targets
        for i in range(3):  # traffic while Prometheus watches, so rates have data
            httpx.post(f"{url}/v1/completions", json={"prompt": f"{i}, {i + 1},", "max_tokens": 8}, timeout=120)
        time.sleep(4)

        from tests.system.test_ops_files import dashboard_queries

        empty = []
        for board, panel, expr in dashboard_queries():
            concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
            reply = query(prom, concrete)
            assert reply["status"] == "success", (board, panel, concrete, reply)
            if not reply["data"]["result"]:
                empty.append(panel)
        assert not CORE_PANELS & set(empty), f"core panels without data: {sorted(CORE_PANELS & set(empty))}"

        rules_loaded = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"][0]["rules"]
        assert {r["name"] for r in rules_loaded} >= {"CloudDown", "NodeDown", "MeshDegraded",
                                                      "HighTimeToFirstToken"}
        assert all(r["health"] == "ok" for r in rules_loaded), rules_loaded

        def cloud_down_state() -> str:
            for group in httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]:
                for rule in group["rules"]:
                    if rule["name"] == "CloudDown":
                        return str(rule["state"])
            return "missing"

        deadline = time.monotonic() + 30
        while cloud_down_state() != "firing" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cloud_down_state() == "firing"

        # The cloud comes back: the gateway's probe sees it and the alert resolves.
        server = http.server.ThreadingHTTPServer(("127.0.0.1", cloud_port), _Models)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            deadline = time.monotonic() + 30
            while cloud_down_state() != "inactive" and time.monotonic() < deadline:
                time.sleep(0.5)
            assert cloud_down_state() == "inactive"
        finally:
            server.shutdown()
            server.server_close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
