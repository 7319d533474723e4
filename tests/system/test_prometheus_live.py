"""A real Prometheus scrapes a live mesh (two nodes and a gateway whose cloud is down), with
the scrape config of deploy/prometheus.yml: it finds the nodes through the gateway's HTTP
service discovery (with the gateway's API key, from a file), no node listed by hand. Every
query of both dashboards evaluates, the core panels have data and their legends' labels
(node names) exist, the alert rules of deploy/alerts.yml load and are healthy, CloudDown
fires during the cloud outage and resolves after it, and NodeDown and MeshDegraded fire when
a node stops (the discovery keeps listing it, so its scrape fails)."""

from __future__ import annotations

import http.server
import json
import random
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, Launcher, Proc, gateway_url, wait_for_nodes
from tests.harness import processes
from tests.static.test_ops_files import dashboard_queries, label_values_selector, legends, variable_queries, yaml

pytestmark = pytest.mark.slow

PROMETHEUS = shutil.which("prometheus")
ALERTS = {"CloudDown", "NodeDown", "MeshDegraded", "HighTimeToFirstToken"}
# Panels that must have data once the mesh has served a few requests (and failed over from
# the dead cloud to the mesh while Prometheus watched).
CORE = {
    "EdgeMesh overview": {"Nodes up", "Cloud up", "Breaker", "Placements", "Route split (requests/s)",
                          "Requests by status", "Time to first token", "Tokens per second", "Failovers",
                          "Nodes ready (gateway view)", "Placement changes", "Placement convergence time"},
    "EdgeMesh node": {"Node up", "Scrape up", "Layers held", "Memory", "Tokens per second", "RPC latency by method",
                      "Loads and releases"},
}
SHORT_FOR = "2s"  # the rules' `for:` in this test, so that it need not wait minutes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reusable_port() -> int:
    """A free port below the kernel's ephemeral range: a test that closes its listener and
    binds the port again later must not find it taken meanwhile by one of the many outgoing
    connections (scrapes, probes), which the kernel gives ports from that range."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(20000, low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 20000-{low}")


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


class Prometheus:
    """/usr/bin/prometheus on loopback, on an ephemeral port, with its own TSDB; ended by process group."""

    def __init__(self, workdir: Path, config: str, rules: str) -> None:
        assert PROMETHEUS is not None
        self.workdir = workdir
        (workdir / "prometheus.yml").write_text(config)
        (workdir / "alerts.yml").write_text(rules)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.popen = processes.popen(
                [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}",
                 f"--storage.tsdb.path={workdir / 'tsdb'}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self.wait_until(self._ready, 30, "prometheus ready")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.popen.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def api(self, path: str, **params: Any) -> Any:
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert reply["status"] == "success", (path, params, reply)
        return reply["data"]

    def query(self, expr: str) -> dict[str, Any]:
        reply: dict[str, Any] = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        return reply

    def rules(self) -> dict[str, dict[str, Any]]:
        return {r["name"]: r for g in self.api("rules")["groups"] for r in g["rules"] if r["type"] == "alerting"}

    def firing(self) -> dict[str, list[dict[str, str]]]:
        out: dict[str, list[dict[str, str]]] = {}
        for alert in self.api("alerts")["alerts"]:
            if alert["state"] == "firing":
                out.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
        return out

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; prometheus log:\n{self.log()}")
            time.sleep(0.3)

    def stop(self) -> None:
        processes.stop_group(self.popen, grace_s=20)


@pytest.fixture
def prometheus_binary() -> str:
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (Debian package prometheus; `make test` installs it)")
    return PROMETHEUS


def concrete(expr: str, node: str) -> str:
    """A dashboard query as Grafana would send it: template variables filled in."""
    out = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "5m")
    out = out.replace("$node", node)
    assert "$" not in out, f"a template variable is left in {out!r}"
    return out


def live_config(gateway: str, key_file: Path) -> str:
    """deploy/prometheus.yml as it is, pointed at this gateway (the service discovery URL, the
    gateway's own target) and this key file, with the intervals of a test."""
    config: dict[str, Any] = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for sd in jobs["edgemesh-node"]["http_sd_configs"]:
        sd["url"] = re.sub(r"^http://[^/]+", f"http://{gateway}", sd["url"])
        sd["refresh_interval"] = "1s"
        sd["authorization"]["credentials_file"] = str(key_file)
    jobs["edgemesh-gateway"]["static_configs"] = [{"targets": [gateway]}]
    return str(yaml.safe_dump(config, sort_keys=False))


def test_dashboards_and_alerts_against_a_live_mesh(launcher: Launcher, default_model: Path, tmp_path: Path,
                                                   prometheus_binary: str) -> None:
    cloud_port = reusable_port()  # nothing listens here yet: the cloud starts out down
    nodes: list[Proc] = [launcher.node(f"node-{i}", default_model) for i in (1, 2)]
    peers = [a for n in nodes for a in ("--peer", f"127.0.0.1:{n.ready[1]}")]
    api_key = "prometheus-test-key"
    gateway = launcher.start("gateway", [
        "gateway", "--model", str(default_model), "--port", "0", "--no-discovery", *peers, "--policy", "cloud-first",
        "--cloud-url", f"http://127.0.0.1:{cloud_port}/v1"], env={"EDGEMESH_API_KEY": api_key})
    url = gateway_url(gateway)
    auth = {"Authorization": f"Bearer {api_key}"}
    wait_for_nodes(url, 2, headers=auth)

    # The gateway's service discovery: the nodes' metrics ports, by name; only with the key.
    node_targets = [f"127.0.0.1:{n.ready[2]}" for n in nodes]
    assert httpx.get(f"{url}/api/prometheus/targets", timeout=10).status_code == 401
    listed = httpx.get(f"{url}/api/prometheus/targets", headers=auth, timeout=10).json()
    assert sorted((t["labels"]["name"], t["targets"]) for t in listed) == [
        (f"node-{i}", [target]) for i, target in enumerate(node_targets, 1)]
    assert {t["labels"]["node_id"] for t in listed} == {n.ready[3] for n in nodes}

    key_file = tmp_path / "api-key"
    key_file.write_text(api_key + "\n")  # as a secret file ends; Prometheus trims the newline
    key_file.chmod(0o600)
    # The real rules, with every `for:` shortened; the job names are those of deploy/prometheus.yml.
    rules = re.sub(r"^(\s+)for: \S+$", rf"\1for: {SHORT_FOR}", (REPO / "deploy" / "alerts.yml").read_text(),
                   flags=re.MULTILINE)
    (tmp_path / "prometheus").mkdir()
    prom = Prometheus(tmp_path / "prometheus", live_config(url.removeprefix("http://"), key_file), rules)
    cloud: http.server.ThreadingHTTPServer | None = None
    try:
        def targets_up() -> bool:
            targets = prom.api("targets")["activeTargets"]
            return len(targets) == 3 and all(t["health"] == "up" for t in targets)

        prom.wait_until(targets_up, 30, "3 targets up (2 of them found through the gateway)")
        found = [t for t in prom.api("targets")["activeTargets"] if t["labels"]["job"] == "edgemesh-node"]
        assert sorted((t["labels"]["name"], t["labels"]["instance"]) for t in found) == [
            (f"node-{i}", target) for i, target in enumerate(node_targets, 1)]
        assert all("state" not in t["labels"] and t["labels"]["node_id"] for t in found), found
        # honor_labels: the node's own identity series keeps node_id and name as they are.
        info = prom.query("edgemesh_node_info")["data"]["result"]
        assert sorted(s["metric"]["name"] for s in info) == ["node-1", "node-2"], info
        assert not any(k.startswith("exported_") for s in info for k in s["metric"]), info

        # Traffic while Prometheus watches: the first requests try the dead cloud and fail over
        # to the mesh (until the breaker opens), so the failover series are born under its eyes.
        for i in range(5):
            chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, headers=auth, json={
                "messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 8})
            assert chat.status_code == 200, chat.text
            text = httpx.post(f"{url}/v1/completions", timeout=120, headers=auth,
                              json={"prompt": f"{i}, {i + 1},", "max_tokens": 8, "stream": i % 2 == 0})
            assert text.status_code == 200, text.text
        time.sleep(3)  # a few more scrapes, so that every rate has two samples after the traffic

        # Every query of every panel and annotation, with "All" nodes (as Grafana sends it: the
        # listed values, regex-escaped) and with one node; the nodes are picked by name.
        names = ["node-1", "node-2"]
        every_node = f"({'|'.join(names)})"  # no character of these names needs escaping
        empty: dict[str, set[str]] = {}
        for node in (every_node, names[0]):
            for board, panel, expr in dashboard_queries():
                reply = prom.query(concrete(expr, node))
                assert reply["status"] == "success", (board, panel, expr, reply)
                if not reply["data"]["result"]:
                    empty.setdefault(board, set()).add(panel)
        scrapes = prom.query(concrete('up{job="edgemesh-node", name=~"$node"}', every_node))["data"]["result"]
        assert sorted(s["metric"]["instance"] for s in scrapes) == sorted(node_targets)  # no other target
        missing = {board: sorted(CORE[board] & empty.get(board, set())) for board in CORE}
        assert not any(missing.values()), f"core panels without data: {missing}"
        # Legends read labels that the series have: a node's {{name}} is never left blank.
        for board, panel, expr, legend in legends():
            wanted = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
            for series in prom.query(concrete(expr, every_node))["data"]["result"]:
                assert wanted <= set(series["metric"]), (board, panel, legend, series["metric"])
                if "name" in wanted:
                    assert series["metric"]["name"] in names, (board, panel, series["metric"])
        # The node variable lists both nodes, by name.
        for _, _, query in variable_queries():
            selector, label = label_values_selector(query)
            assert sorted(prom.api(f"label/{label}/values", **{"match[]": selector})) == names

        # The alert rules load and evaluate; with the mesh whole, only the cloud is missing.
        prom.wait_until(lambda: all(r["health"] == "ok" for r in prom.rules().values()), 15, "rules evaluated")
        loaded = prom.rules()
        assert set(loaded) >= ALERTS, sorted(loaded)
        assert all(r["health"] == "ok" and not r.get("lastError") for r in loaded.values()), loaded
        prom.wait_until(lambda: "CloudDown" in prom.firing(), 30, "CloudDown firing")
        assert set(prom.firing()) == {"CloudDown"}, prom.firing()
        assert [a["instance"] for a in prom.firing()["CloudDown"]] == [url.removeprefix("http://")]

        # The cloud comes back (and stays): the gateway's probe sees it and the alert resolves.
        cloud = http.server.ThreadingHTTPServer(("127.0.0.1", cloud_port), _Models)
        threading.Thread(target=cloud.serve_forever, daemon=True).start()
        prom.wait_until(lambda: prom.rules()["CloudDown"]["state"] == "inactive", 30, "CloudDown resolved")

        # A node stops (SIGTERM: it drains and exits): NodeDown for it, and the mesh is degraded.
        nodes[1].stop()

        def node_2_down() -> bool:
            firing = prom.firing()
            down = firing.get("NodeDown", [])
            return ("MeshDegraded" in firing
                    and any(a["job"] == "edgemesh-node" and a["instance"] == node_targets[1]
                            and a.get("name") == "node-2" for a in down)  # scrape: still listed by the gateway
                    and any(a["job"] == "edgemesh-gateway" and a.get("name") == "node-2" for a in down))  # gateway

        prom.wait_until(node_2_down, 30, "NodeDown (scrape and gateway) and MeshDegraded for node-2")
        firing = prom.firing()
        assert len(firing["NodeDown"]) == 2, firing  # node-1 is not down
        assert set(firing) == {"NodeDown", "MeshDegraded"}, firing
    finally:
        prom.stop()
        if cloud is not None:
            cloud.shutdown()
            cloud.server_close()
