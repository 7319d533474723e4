"""The deployment and monitoring files say what they must: compose services, mounts and
ports; commands that the real CLI accepts; valid systemd units; Prometheus config and rules
that promtool accepts; dashboards whose queries use only metrics that exist."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mesh.cli import build_parser
from mesh.metrics import GatewayMetrics, NodeMetrics
from tests.conftest import REPO

yaml = pytest.importorskip("yaml", reason="PyYAML (a dev dependency) is needed to read the compose file")

DEPLOY = REPO / "deploy"
DASHBOARDS = REPO / "grafana" / "dashboards"


def catalogue() -> set[str]:
    names = {"up"}
    for metrics in (NodeMetrics, GatewayMetrics):
        registry = CollectorRegistry()
        metrics(registry)
        for family in registry.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
            names.update(family.name + suffix for suffix in suffixes)
    return names


def parses(argv: list[str]) -> None:
    """The CLI accepts these arguments (argparse exits on an unknown flag)."""
    build_parser().parse_args(argv)


def test_compose_file_has_the_mesh_and_its_monitoring() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"node-1", "node-2", "node-3", "gateway", "prometheus", "grafana"} <= set(services)
    for name in ("node-1", "node-2", "node-3", "gateway"):
        command = services[name]["command"]
        parses(command)
        assert "--host" in command and command[command.index("--host") + 1] == "0.0.0.0"
    gateway = services["gateway"]
    assert "EDGEMESH_API_KEY" in gateway["environment"]  # a LAN bind needs one
    assert gateway["ports"] == ["127.0.0.1:8080:8080"]
    peers = [gateway["command"][i + 1] for i, a in enumerate(gateway["command"]) if a == "--peer"]
    assert peers == ["node-1:7471", "node-2:7471", "node-3:7471"]
    for service in ("prometheus", "grafana"):
        for mount in services[service]["volumes"]:
            source = (DEPLOY / mount.split(":")[0]).resolve()
            assert source.exists(), f"{service} mounts {source}, which is not in the repository"
    build = services["node-1"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()


def test_dockerfile_installs_edgemesh_and_pulls_the_model() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1\d", text, re.MULTILINE)
    assert "pip install" in text and "edgemesh model pull default" in text
    assert re.search(r'^ENTRYPOINT \["edgemesh"\]', text, re.MULTILINE)
    assert re.search(r"^USER ", text, re.MULTILINE)  # not root
    for copied in re.findall(r"^COPY (\S+)", text, re.MULTILINE):
        assert (REPO / copied).exists(), copied


@pytest.mark.parametrize("unit", ["edgemesh-node.service", "edgemesh-gateway.service"])
def test_systemd_units(unit: str, tmp_path: Path) -> None:
    text = (DEPLOY / "systemd" / unit).read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", text, re.MULTILINE)
    assert exec_start is not None
    argv = shlex.split(exec_start.group(1))
    assert argv[0].endswith("/edgemesh")
    parses(argv[1:])
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    if "node" in unit:
        assert stop > 60  # longer than the node's drain
    assert "Restart=on-failure" in text and "KillSignal=SIGTERM" in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; the unit's syntax was checked by hand above")
    # Point ExecStart at a program that exists here, so verify checks the unit, not this machine.
    stand_in = tmp_path / "edgemesh"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    copy = tmp_path / unit
    copy.write_text(text.replace(argv[0], str(stand_in)))
    done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [line for line in done.stderr.splitlines() if unit in line and "EnvironmentFile" not in line]
    assert not problems, done.stderr


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus; `make test` installs it)")
    return path


def test_prometheus_config_and_rules_pass_promtool() -> None:
    tool = promtool()
    for args in (["check", "config", str(DEPLOY / "prometheus.yml")], ["check", "rules", str(DEPLOY / "alerts.yml")]):
        done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"CloudDown", "NodeDown", "MeshDegraded", "HighTimeToFirstToken"} <= names


def dashboard_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                out.append((board["title"], panel["title"], target["expr"]))
        for annotation in board["annotations"]["list"]:
            if "expr" in annotation:
                out.append((board["title"], annotation["name"], annotation["expr"]))
    return out


def test_dashboards_are_valid_and_use_only_catalogue_metrics() -> None:
    known = catalogue()
    titles = set()
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        titles.add(board["title"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)) and all("gridPos" in p and p["targets"] for p in board["panels"])
    assert titles == {"EdgeMesh overview", "EdgeMesh node"}
    functions = {"sum", "max", "min", "rate", "increase", "changes", "histogram_quantile", "by", "on", "and",
                 "or", "label_values", "max_over_time", "count", "le", "vector"}
    for board, panel, expr in dashboard_queries():
        cleaned = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", "", expr)
        for word in re.findall(r"[a-z_][a-z0-9_]*", cleaned):
            if word in functions or not word.startswith(("edgemesh_", "up")):
                continue
            assert word in known, f"{board} / {panel}: {word} is not in the metric catalogue"


def test_dashboards_are_generated_from_the_script(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts" / "gen_dashboards.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=60)
    for path in DASHBOARDS.glob("*.json"):
        assert (tmp_path / path.name).read_text() == path.read_text(), \
            f"{path.name} is stale: run scripts/gen_dashboards.py"
