"""The deployment and monitoring files say what they must: compose services, mounts and
ports; `edgemesh` command lines that the real CLI accepts; valid systemd units; a Prometheus
config and alert rules that promtool accepts and whose alerts fire when they should (promtool
rule unit tests); dashboards whose queries use only metrics of the catalogue in mesh/metrics.py.

Static and fast (no model, no processes but promtool and systemd-analyze); tests/system/
test_prometheus_live.py runs the same files against a real Prometheus and a live mesh.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mesh.cli import build_parser
from mesh.config import Timeouts
from mesh.metrics import GatewayMetrics, NodeMetrics
from tests.conftest import REPO

yaml = pytest.importorskip("yaml", reason="PyYAML (the dev extra pyyaml) is needed to read the YAML files")

DEPLOY = REPO / "deploy"
DASHBOARDS = REPO / "grafana" / "dashboards"
PROVISIONING = REPO / "grafana" / "provisioning"
UNITS = ("edgemesh-node.service", "edgemesh-gateway.service")
REQUIRED_ALERTS = {"CloudDown", "NodeDown", "MeshDegraded", "HighTimeToFirstToken"}
DATASOURCE_UID = "prometheus"
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range", "__all"}


# ---------------------------------------------------------------------------- helpers

def catalogue() -> set[str]:
    """Every series name the processes export (with the _total/_bucket/_sum/_count suffixes),
    plus Prometheus's own `up`."""
    names = {"up"}
    for metrics in (NodeMetrics, GatewayMetrics):
        registry = CollectorRegistry()
        metrics(registry)
        for family in registry.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
            names.update(family.name + suffix for suffix in suffixes)
    return names


PROMQL_FUNCTIONS = {
    # aggregations
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor", "histogram_quantile",
    "holt_winters", "hour", "idelta", "increase", "irate", "label_join", "label_replace", "ln", "log2", "log10",
    "minute", "month", "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt",
    "time", "timestamp", "vector", "year", "avg_over_time", "min_over_time", "max_over_time", "sum_over_time",
    "count_over_time", "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time",
    "present_over_time",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects. Raises on an unknown function, so a typo
    in a function name fails as well."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'", '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\boffset\s+\S+", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    s = re.sub(r"(?<![\w.])\d+(\.\d+)?([eE][+-]?\d+)?(?![\w.])", " ", s)  # numbers
    names = set()
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", s):
        word, call = match.group(1), match.group(2)
        if word.lower() in PROMQL_KEYWORDS:
            continue
        if call and word not in PROMQL_FUNCTIONS:
            raise ValueError(f"unknown PromQL function {word!r} in {expr!r}")
        if not call:
            names.add(word)
    return names


def interpolate(text: str) -> str:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR:?message} and $VAR -> dummy values ($$ -> $)."""
    pattern = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_]\w*)(?::?[-?+][^}]*)?\}"
                         r"|(?P<plain>[A-Za-z_]\w*)|(?P<dollar>\$))")

    def dummy(match: re.Match[str]) -> str:
        if match.group("dollar"):
            return "$"
        return f"dummy-{(match.group('braced') or match.group('plain')).lower()}"

    return pattern.sub(dummy, text)


def systemd_expand(text: str) -> str:
    """systemd specifiers (%S, %C, %H, ...) and ${VAR}/$VAR in a command line -> dummy values."""
    text = re.sub(r"%(.)", lambda m: "%" if m.group(1) == "%" else f"dummy-specifier-{m.group(1)}", text)
    return interpolate(text)


def parses(argv: list[str], where: str) -> None:
    """The real CLI accepts these arguments (argparse exits with status 2 on an unknown flag)."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{where}: `edgemesh {shlex.join(argv)}` is rejected by the CLI") from exc


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(interpolate((DEPLOY / "docker-compose.yml").read_text()))
    return loaded


def unit_file(name: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values...]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{name}: cannot parse {raw!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def dockerfile_entrypoint() -> list[str]:
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "the Dockerfile has no exec-form ENTRYPOINT"
    entrypoint: list[str] = json.loads(match.group(1))
    return entrypoint


def edgemesh_services(services: dict[str, Any]) -> dict[str, Any]:
    """The compose services that run the EdgeMesh image."""
    return {name: s for name, s in services.items() if str(s.get("image", "")).startswith("edgemesh")
            or "Dockerfile" in str(s.get("build", {}).get("dockerfile", ""))}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host source of a service's volumes (short syntax)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def boards() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(DASHBOARDS.glob("*.json")):
        yield path, json.loads(path.read_text())


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard title, panel title or annotation name, PromQL) of every query of every
    dashboard: panel targets and annotation queries. Also used by test_prometheus_live."""
    out = []
    for _, board in boards():
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((board["title"], panel["title"], target["expr"]))
        for annotation in board["annotations"]["list"]:
            if "expr" in annotation:
                out.append((board["title"], annotation["name"], annotation["expr"]))
    return out


def variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard title, variable name, query) of every query template variable."""
    out = []
    for _, board in boards():
        for variable in board.get("templating", {}).get("list", []):
            if variable.get("type") == "query":
                query = variable["query"]
                out.append((board["title"], variable["name"], query["query"] if isinstance(query, dict) else query))
    return out


def label_values_selector(query: str) -> tuple[str, str]:
    """Grafana's label_values(selector, label) -> (selector, label)."""
    match = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*", query)
    assert match, f"not a label_values() query: {query!r}"
    return match.group(1), match.group(2)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)(ms|s|m|h|d)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


# ---------------------------------------------------------------------------- compose

def test_compose_services_commands_and_ports() -> None:
    services = compose()["services"]
    assert {"node-1", "node-2", "node-3", "gateway", "prometheus", "grafana"} <= set(services)
    entrypoint = dockerfile_entrypoint()
    ours = edgemesh_services(services)
    assert set(ours) == {"node-1", "node-2", "node-3", "gateway"}
    node_ports = {}
    for name, service in ours.items():
        command = service["command"]
        assert isinstance(command, list), f"{name}: use the exec form (a list) for command"
        parses(command, f"docker-compose.yml {name}")
        assert flag(command, "--host") == "0.0.0.0"  # reachable inside the compose network
        assert "entrypoint" not in service or service["entrypoint"] == entrypoint
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
        if name.startswith("node-"):
            assert command[0] == "node" and flag(command, "--name") == name and flag(command, "--model") == "default"
            assert service["environment"]["EDGEMESH_CLUSTER_KEY"], f"{name} needs the cluster key"
            assert seconds(service["stop_grace_period"]) > Timeouts().drain_s, "a node must get time to drain"
            node_ports[name] = (int(flag(command, "--port")), int(flag(command, "--metrics-port")))
            assert "ports" not in service, "nodes stay inside the compose network"

    gateway = services["gateway"]
    command = gateway["command"]
    assert command[0] == "gateway"
    peers = [command[i + 1] for i, a in enumerate(command) if a == "--peer"]
    assert peers == [f"{n}:{node_ports[n][0]}" for n in ("node-1", "node-2", "node-3")]
    assert "--no-discovery" in command  # mDNS does not cross the bridge network
    # A gateway on 0.0.0.0 refuses to start without an API key: as a flag or as EDGEMESH_API_KEY.
    assert "--api-key" in command or gateway["environment"].get("EDGEMESH_API_KEY")
    port = int(flag(command, "--port"))
    assert gateway["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000"]


def test_compose_requires_the_secrets() -> None:
    """Unset keys stop `docker compose up` at once (${VAR:?...}) instead of starting a mesh
    with an empty cluster key or a gateway without an API key."""
    text = (DEPLOY / "docker-compose.yml").read_text()
    for variable in ("EDGEMESH_CLUSTER_KEY", "EDGEMESH_API_KEY"):
        uses = re.findall(r"\$\{" + variable + r"([^}]*)\}", text)
        assert uses and all(u.startswith(":?") for u in uses), f"{variable} must be required: {uses}"


def test_compose_model_cache_is_shared_under_edgemesh_home() -> None:
    services = compose()
    home = re.search(r"EDGEMESH_HOME=(\S+)", (DEPLOY / "Dockerfile").read_text())
    assert home, "the Dockerfile sets EDGEMESH_HOME"
    for name, service in edgemesh_services(services["services"]).items():
        assert service["environment"].get("EDGEMESH_HOME", home.group(1)) == home.group(1)
        volume = mounts(service).get(f"{home.group(1)}/models")
        assert volume == "models", f"{name} does not mount the shared model cache at $EDGEMESH_HOME/models"
    assert "models" in services["volumes"]


def test_compose_mounts_the_monitoring_files_where_they_are_read() -> None:
    services = compose()["services"]
    prometheus, grafana = mounts(services["prometheus"]), mounts(services["grafana"])
    for service in (prometheus, grafana):
        for target, source in service.items():
            if source.startswith("."):
                assert (DEPLOY / source).resolve().exists(), f"{source} (mounted at {target}) is not in the repository"
    config_flag = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    assert (DEPLOY / prometheus[config_path]).resolve() == (DEPLOY / "prometheus.yml").resolve()
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:  # relative to the config file's directory
        target = str(Path(config_path).parent / rule_file)
        assert (DEPLOY / prometheus[target]).resolve() == (DEPLOY / "alerts.yml").resolve()
    assert (DEPLOY / grafana["/etc/grafana/provisioning"]).resolve() == PROVISIONING.resolve()
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "edgemesh.yml").read_text())["providers"][0]
    dashboards_path = provider["options"]["path"]
    assert (DEPLOY / grafana[dashboards_path]).resolve() == DASHBOARDS.resolve()


def test_prometheus_finds_the_nodes_through_the_gateway() -> None:
    """No node is listed by hand: the node job asks the gateway (HTTP service discovery, with
    the API key from a file that compose provides); only the gateway itself is a static target."""
    services = compose()["services"]
    text = (DEPLOY / "prometheus.yml").read_text()
    config = yaml.safe_load(text)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) >= {"edgemesh-node", "edgemesh-gateway"}
    nodes = jobs["edgemesh-node"]
    assert "static_configs" not in nodes and "file_sd_configs" not in nodes, "node targets are listed by hand"
    for name in ("node-1", "node-2", "node-3"):
        assert name not in re.sub(r"#.*", "", text), f"{name} is named in prometheus.yml"
    [sd] = nodes["http_sd_configs"]
    gateway_port = flag(services["gateway"]["command"], "--port")
    assert sd["url"] == f"http://gateway:{gateway_port}/api/prometheus/targets"
    assert sd["authorization"].get("type", "Bearer") == "Bearer"
    # The key comes from a file; in compose, the secret that carries the gateway's own key.
    key_file = sd["authorization"]["credentials_file"]
    assert "credentials" not in sd["authorization"], "the API key must not be written into prometheus.yml"
    secret = key_file.removeprefix("/run/secrets/")
    assert key_file == f"/run/secrets/{secret}" and secret in services["prometheus"]["secrets"]
    assert compose()["secrets"][secret] == {"environment": "EDGEMESH_API_KEY"}
    assert "EDGEMESH_API_KEY" in services["gateway"]["environment"]
    assert 5 <= seconds(sd.get("refresh_interval", "60s")) <= 60, "a node that joins is scraped within a minute"
    # The node's own node_id/name labels (edgemesh_node_info) stay as they are, and the state
    # the gateway reports does not become a label (it would split every series when it changes).
    assert nodes.get("honor_labels") is True
    assert {"action": "labeldrop", "regex": "state"} in nodes.get("relabel_configs", [])
    # What the gateway will list: its peers' host names, on the nodes' metrics ports.
    command = services["gateway"]["command"]
    peers = [a for i, a in enumerate(command) if command[i - 1] == "--peer"]
    assert [p.split(":")[0] for p in peers] == ["node-1", "node-2", "node-3"]
    assert {flag(services[n]["command"], "--metrics-port") for n in ("node-1", "node-2", "node-3")} == {"9471"}
    gateway_targets = [t for sc in jobs["edgemesh-gateway"]["static_configs"] for t in sc["targets"]]
    assert gateway_targets == [f"gateway:{flag(services['gateway']['command'], '--port')}"] == ["gateway:8080"]
    assert jobs["edgemesh-gateway"].get("metrics_path", "/metrics") == "/metrics"
    assert config["rule_files"] == ["alerts.yml"]
    for rule in alert_rules():  # the job names the rules select exist
        for job in re.findall(r'job="([^"]+)"', rule["expr"]):
            assert job in jobs, f"{rule['alert']} selects job {job!r}, which prometheus.yml does not scrape"


def test_compose_file_is_valid_for_docker_compose(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True,
                                        timeout=30).returncode != 0:
        pytest.skip("`docker compose` is not installed; the compose file was checked field by field above")
    env = {"EDGEMESH_CLUSTER_KEY": "k", "EDGEMESH_API_KEY": "a", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([docker, "compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------- image

def test_dockerfile_builds_a_non_root_edgemesh_image() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert froms and all(f.startswith("python:3.11-slim") for f in froms)
    assert re.search(r"build-essential.*cmake|cmake.*build-essential", text), "llama-cpp-python compiles"
    assert re.search(r"pip (install|wheel)\b[^\n]*\s\.$", text, re.MULTILINE), "the package itself is built"
    assert re.search(r"pip install\b[^\n]*\bedgemesh\b|pip install\b[^\n]*\s\.$", text, re.MULTILINE)
    assert dockerfile_entrypoint() == ["edgemesh"]
    final_stage = text.split("\nFROM ")[-1]
    users = re.findall(r"^USER\s+(\S+)", final_stage, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"
    # The model is pulled at build time, by the user that runs the image, through the real CLI.
    runs = re.findall(r"(?:^RUN\s+|&&\s*)(?:\w+=\S*\s+)*edgemesh\s+([^&\n\\]+)", final_stage, re.MULTILINE)
    pulls = [shlex.split(r) for r in runs]
    assert ["model", "pull", "default"] in pulls
    for argv in pulls:
        parses(argv, "Dockerfile")
    assert final_stage.index("USER ") < final_stage.index("edgemesh model pull default")
    ignore = DEPLOY / "Dockerfile.dockerignore"  # BuildKit's per-Dockerfile ignore file: a whitelist
    kept = {line[1:] for line in ignore.read_text().splitlines() if line.startswith("!")} if ignore.exists() else None
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.MULTILINE):
        for copied in line.split()[:-1]:
            assert (REPO / copied).exists(), copied
            assert kept is None or copied in kept, f"{copied} is copied but left out of the build context"


# ---------------------------------------------------------------------------- systemd

@pytest.mark.parametrize("unit", UNITS)
def test_systemd_unit_runs_a_real_command_with_hardening(unit: str) -> None:
    sections = unit_file(unit)
    service = {key: values[-1] for key, values in sections["Service"].items()}
    assert set(sections) == {"Unit", "Service", "Install"}
    assert service["EnvironmentFile"] == "/etc/edgemesh/edgemesh.env"
    for key in ("ExecStart", "ExecStartPre", "ExecStartPost", "ExecReload", "ExecStop"):
        for line in sections["Service"].get(key, []):
            argv = shlex.split(systemd_expand(line.lstrip("-@:+!")))
            if argv[0].endswith("/edgemesh"):
                assert argv[0].startswith("/"), "systemd needs an absolute path"
                parses(argv[1:], f"{unit} {key}")
    exec_start = shlex.split(systemd_expand(service["ExecStart"]))
    role = unit.removeprefix("edgemesh-").removesuffix(".service")
    assert exec_start[0].endswith("/edgemesh") and exec_start[1] == role
    assert service["Restart"] == "on-failure" and service["KillSignal"] == "SIGTERM"
    if role == "node":  # SIGTERM drains: the stop timeout must outlast the drain
        assert seconds(service["TimeoutStopSec"] + ("" if service["TimeoutStopSec"][-1].isalpha() else "s")) \
            > Timeouts().drain_s
    assert service["NoNewPrivileges"] == "yes"
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root", "0")
    assert service.get("ProtectSystem") in ("strict", "full") and service.get("PrivateTmp") == "yes"
    # EDGEMESH_HOME is the directory systemd creates and makes writable for the service.
    environment = dict(item.split("=", 1) for line in sections["Service"].get("Environment", [])
                       for item in shlex.split(line))
    writable = [f"/var/lib/{d}" for d in service.get("StateDirectory", "").split()] + \
               [f"/var/cache/{d}" for d in service.get("CacheDirectory", "").split()]
    assert environment.get("EDGEMESH_HOME") in writable, (environment, writable)
    assert sections["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd); the unit was parsed above")
    # ExecStart names /opt/edgemesh/bin/edgemesh, which this machine need not have: point a copy
    # at a program that exists, so that verify judges the unit, not this machine.
    text = (DEPLOY / "systemd" / unit).read_text()
    binary = shlex.split(unit_file(unit)["Service"]["ExecStart"][-1])[0]
    stand_in = tmp_path / "edgemesh"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    copy = tmp_path / unit
    copy.write_text(text.replace(binary, str(stand_in)))
    done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on "Unknown key ..., ignoring" and similar: every line about the file counts.
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if unit in line and "EnvironmentFile" not in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


# ---------------------------------------------------------------------------- Prometheus

def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus; `make test` installs it)")
    return path


def test_promtool_checks_config_and_rules() -> None:
    tool = promtool()
    for args in (["check", "config", str(DEPLOY / "prometheus.yml")], ["check", "rules", str(DEPLOY / "alerts.yml")]):
        done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_say_what_the_issue_asks() -> None:
    known = catalogue()
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) >= REQUIRED_ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{name} uses {unknown}, which no EdgeMesh process exports"
    assert rules["CloudDown"]["for"] == "1m" and "edgemesh_cloud_up" in rules["CloudDown"]["expr"]
    assert "edgemesh_cloud_breaker_state" in rules["CloudDown"]["expr"]  # only where a cloud is configured
    assert rules["NodeDown"]["for"] == "1m"
    assert {"edgemesh_mesh_nodes", "edgemesh_placements"} <= metric_names(rules["MeshDegraded"]["expr"])
    assert rules["HighTimeToFirstToken"]["for"] == "5m"
    ttft = re.sub(r"\s+", " ", rules["HighTimeToFirstToken"]["expr"])
    assert "histogram_quantile(0.95," in ttft and "edgemesh_time_to_first_token_seconds_bucket[5m]" in ttft
    assert re.search(r"\)\s*>\s*5\s*$", ttft)


# promtool rule unit tests: series in, alerts out (annotations are stripped from the rules under
# test, so the wording can change freely; labels and timing are what is checked).
GW = 'job="edgemesh-gateway"'
STATES = ("joining", "ready", "draining", "down", "unauthenticated", "incompatible")


def _mesh_nodes(instance: str, **states: str) -> list[dict[str, str]]:
    return [{"series": f'edgemesh_mesh_nodes{{{GW}, instance="{instance}", state="{s}"}}',
             "values": states.get(s, "0x30")} for s in STATES]


def _alert(labels: dict[str, str]) -> dict[str, Any]:
    return {"exp_labels": labels}


RULE_TESTS: list[dict[str, Any]] = [
    {   # CloudDown: only where a cloud is configured (gateway "cloud"); never on "local"
        "interval": "1m",
        "input_series": [
            {"series": f'edgemesh_cloud_up{{{GW}, instance="cloud"}}', "values": "1 1 0x10 1x5"},
            *[{"series": f'edgemesh_cloud_breaker_state{{{GW}, instance="cloud", state="{s}"}}',
               "values": v} for s, v in (("closed", "1 1 0x15"), ("open", "0 0 1x15"), ("half_open", "0x17"))],
            {"series": f'edgemesh_cloud_up{{{GW}, instance="local"}}', "values": "0x17"},
        ],
        "alert_rule_test": [
            {"eval_time": "2m", "alertname": "CloudDown", "exp_alerts": []},  # pending
            {"eval_time": "5m", "alertname": "CloudDown",
             "exp_alerts": [_alert({"severity": "warning", "job": "edgemesh-gateway", "instance": "cloud"})]},
            {"eval_time": "15m", "alertname": "CloudDown", "exp_alerts": []},  # back up
        ],
    },
    {   # NodeDown: from the scrape, and from the gateway; a restarted node (new id, same name) is not down
        "interval": "1m",
        "input_series": [  # node targets carry the name and node_id the gateway's discovery gives them
            {"series": 'up{job="edgemesh-node", instance="node-1:9471", name="node-1", node_id="n1"}',
             "values": "1x10"},
            {"series": 'up{job="edgemesh-node", instance="node-2:9471", name="node-2", node_id="n2"}',
             "values": "1 1 0x8"},
            {"series": f'edgemesh_mesh_node_up{{{GW}, instance="gw", node_id="a1", name="node-3"}}',
             "values": "1 1 0x8"},  # node-3 restarted: its old id stays at 0 ...
            {"series": f'edgemesh_mesh_node_up{{{GW}, instance="gw", node_id="a2", name="node-3"}}',
             "values": "_ _ _ 1x7"},  # ... and its new id is ready
            {"series": f'edgemesh_mesh_node_up{{{GW}, instance="gw", node_id="b1", name="node-4"}}',
             "values": "1 1 0x8"},
        ],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "NodeDown", "exp_alerts": []},
            {"eval_time": "6m", "alertname": "NodeDown", "exp_alerts": [
                _alert({"severity": "warning", "job": "edgemesh-node", "instance": "node-2:9471", "name": "node-2",
                        "node_id": "n2"}),
                _alert({"severity": "warning", "job": "edgemesh-gateway", "instance": "gw", "node_id": "b1",
                        "name": "node-4"}),
            ]},
        ],
    },
    {   # MeshDegraded: (a) a followed node is not ready, (b) placements lost; not for nodes of
        # another mesh (unauthenticated), and not in a steady mesh
        "interval": "1m",
        "input_series": [
            *_mesh_nodes("lost-node", ready="3x5 2x25", down="0x5 1x25"),
            {"series": f'edgemesh_placements{{{GW}, instance="lost-node", kind="replica"}}',
             "values": "3x5 2x25"},
            *_mesh_nodes("lost-placement", ready="2x30"),
            {"series": f'edgemesh_placements{{{GW}, instance="lost-placement", kind="pipeline"}}',
             "values": "2x5 1x25"},
            *_mesh_nodes("steady", ready="2x30", unauthenticated="1x30"),
            {"series": f'edgemesh_placements{{{GW}, instance="steady", kind="replica"}}', "values": "2x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "MeshDegraded", "exp_alerts": []},
            {"eval_time": "6m", "alertname": "MeshDegraded", "exp_alerts": []},  # pending: for 2m
            {"eval_time": "9m", "alertname": "MeshDegraded", "exp_alerts": [
                _alert({"severity": "warning", "job": "edgemesh-gateway", "instance": "lost-node"}),
                _alert({"severity": "warning", "job": "edgemesh-gateway", "instance": "lost-placement"}),
            ]},
            {"eval_time": "9m", "alertname": "MeshUnavailable", "exp_alerts": []},
        ],
    },
    {   # MeshUnavailable: no placement at all
        "interval": "1m",
        "input_series": [
            {"series": f'edgemesh_placements{{{GW}, instance="gw", kind="replica"}}', "values": "1 1 0x8"},
            {"series": f'edgemesh_placements{{{GW}, instance="gw", kind="pipeline"}}', "values": "0x10"},
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "MeshUnavailable",
             "exp_alerts": [_alert({"severity": "critical", "job": "edgemesh-gateway", "instance": "gw"})]},
        ],
    },
    {   # GatewayDown: the scrape of the gateway fails
        "interval": "1m",
        "input_series": [{"series": 'up{job="edgemesh-gateway", instance="gateway:8080"}', "values": "1 0x5"}],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "GatewayDown", "exp_alerts": []},
            {"eval_time": "3m", "alertname": "GatewayDown", "exp_alerts": [
                _alert({"severity": "critical", "job": "edgemesh-gateway", "instance": "gateway:8080"})]},
        ],
    },
    {   # HighTimeToFirstToken: 90% of first tokens between 5 and 10 s on "slow", all under 0.5 s on "fast"
        "interval": "1m",
        "input_series": [
            *[{"series": f'edgemesh_time_to_first_token_seconds_bucket{{{GW}, instance="slow", route="mesh", '
                         f'le="{le}"}}', "values": v}
              for le, v in (("0.5", "0+1x20"), ("5.0", "0+1x20"), ("10.0", "0+10x20"), ("+Inf", "0+10x20"))],
            *[{"series": f'edgemesh_time_to_first_token_seconds_bucket{{{GW}, instance="fast", route="mesh", '
                         f'le="{le}"}}', "values": "0+10x20"} for le in ("0.5", "5.0", "10.0", "+Inf")],
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "HighTimeToFirstToken", "exp_alerts": []},  # pending: for 5m
            {"eval_time": "12m", "alertname": "HighTimeToFirstToken",
             "exp_alerts": [_alert({"severity": "warning", "job": "edgemesh-gateway", "instance": "slow"})]},
        ],
    },
]


def test_alert_rules_fire_when_they_should(tmp_path: Path) -> None:
    tool = promtool()
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(groups))
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(
        {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": RULE_TESTS}, sort_keys=False))
    done = subprocess.run([tool, "test", "rules", "alerts_test.yml"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------- Grafana

def test_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    prometheus = next(d for d in datasources if d["type"] == "prometheus")
    assert prometheus["uid"] == DATASOURCE_UID and prometheus["url"] == "http://prometheus:9090"
    assert "prometheus" in compose()["services"]  # the host name of the URL
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "edgemesh.yml").read_text())["providers"]
    assert [(p["type"], p["options"]["path"]) for p in providers] == [("file", "/var/lib/grafana/dashboards")]


def _overlaps(a: dict[str, int], b: dict[str, int]) -> bool:
    return (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


def test_dashboards_are_valid_grafana_json() -> None:
    titles = {}
    for path, board in boards():
        titles[board["title"]] = path.name
        assert board["uid"] and 36 <= board["schemaVersion"] <= 41, path.name
        panels = board["panels"]
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in panels:
            grid = panel["gridPos"]
            assert all(isinstance(grid[k], int) for k in "hwxy") and grid["x"] + grid["w"] <= 24, panel["title"]
            assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
            targets = panel["targets"]
            assert targets and all(t["expr"].strip() for t in targets), f"{panel['title']} has no query"
            assert all(t["datasource"]["uid"] == DATASOURCE_UID for t in targets)
            ref_ids = [t["refId"] for t in targets]
            assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for i, a in enumerate(panels):
            for b in panels[i + 1:]:
                assert not _overlaps(a["gridPos"], b["gridPos"]), f"{a['title']} overlaps {b['title']}"
        for annotation in board["annotations"]["list"]:
            if "expr" in annotation:
                assert annotation["datasource"]["uid"] == DATASOURCE_UID
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                assert variable["datasource"]["uid"] == DATASOURCE_UID
        defined = {v["name"] for v in board["templating"]["list"]} | GRAFANA_VARIABLES
        used = set(re.findall(r"\$\{?(\w+)", json.dumps([p["targets"] for p in panels])))
        assert used <= defined, f"{path.name} uses undefined variables {used - defined}"
    assert titles == {"EdgeMesh overview": "edgemesh-overview.json", "EdgeMesh node": "edgemesh-node.json"}


def test_dashboard_queries_use_only_catalogue_metrics() -> None:
    known = catalogue()
    queries = dashboard_queries() + [(b, v, label_values_selector(q)[0]) for b, v, q in variable_queries()]
    for board, panel, expr in queries:
        unknown = metric_names(expr) - known
        assert not unknown, f"{board} / {panel}: {sorted(unknown)} not in the metric catalogue ({expr})"


OVERVIEW_NEEDS = {  # what the issue asks the overview to show -> metrics its queries must read
    "nodes up": {"edgemesh_mesh_node_up"}, "cloud up": {"edgemesh_cloud_up"},
    "route split / requests by status": {"edgemesh_requests_total"},
    "failovers": {"edgemesh_failovers_total"},
    "time to first token": {"edgemesh_time_to_first_token_seconds_bucket"},
    "tokens/s": {"edgemesh_tokens_generated_total"},
    "inter-token latency": {"edgemesh_inter_token_latency_seconds_bucket"},
    "queue depth": {"edgemesh_queue_depth"}, "in-flight": {"edgemesh_in_flight_requests"},
    "breaker": {"edgemesh_cloud_breaker_state"},
}
NODE_NEEDS = {
    "health": {"edgemesh_node_up"}, "memory": {"edgemesh_node_memory_bytes"},
    "layers": {"edgemesh_node_layers_held"}, "KV slots": {"edgemesh_node_kv_slots_in_use"},
    "stage sessions": {"edgemesh_node_stage_sessions"},
    "stage step latency": {"edgemesh_node_stage_step_seconds_bucket"},
    "RPC latency": {"edgemesh_node_rpc_duration_seconds_bucket"},
    "bytes": {"edgemesh_node_bytes_received_total", "edgemesh_node_bytes_sent_total"},
    "errors": {"edgemesh_node_rpc_errors_total"}, "auth failures": {"edgemesh_node_auth_failures_total"},
    "tokens/s": {"edgemesh_node_tokens_generated_total"},
}


def test_dashboards_show_what_the_issue_asks() -> None:
    by_board: dict[str, list[str]] = {}
    for board, _, expr in dashboard_queries():
        by_board.setdefault(board, []).append(expr)
    for board, needs in (("EdgeMesh overview", OVERVIEW_NEEDS), ("EdgeMesh node", NODE_NEEDS)):
        used = set().union(*(metric_names(e) for e in by_board[board]))
        for what, metrics in needs.items():
            assert metrics <= used, f"{board} does not show {what} ({metrics - used})"
    overview = json.loads((DASHBOARDS / "edgemesh-overview.json").read_text())
    annotations = [a for a in overview["annotations"]["list"] if "expr" in a]
    assert any("edgemesh_failovers_total" in a["expr"] for a in annotations), "failovers as annotations"
    ttft = [e for e in by_board["EdgeMesh overview"] if "edgemesh_time_to_first_token_seconds_bucket" in e]
    assert {q for e in ttft for q in re.findall(r"histogram_quantile\(([\d.]+)", e)} >= {"0.5", "0.95", "0.99"}
    assert any("rate(edgemesh_requests_total" in e and "by (route)" in e for e in by_board["EdgeMesh overview"])


def test_node_dashboard_is_filtered_by_a_node_variable() -> None:
    board = json.loads((DASHBOARDS / "edgemesh-node.json").read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert "node" in variables
    query = variables["node"]["query"]
    selector, label = label_values_selector(query["query"] if isinstance(query, dict) else query)
    # By name (people pick "laptop", not 198.18.0.1:9471), from the scrape targets the gateway lists.
    assert (metric_names(selector), label) in (({"up"}, "name"), ({"edgemesh_node_info"}, "name"))
    assert 'job="edgemesh-node"' in selector or metric_names(selector) == {"edgemesh_node_info"}
    for panel in board["panels"]:
        for target in panel["targets"]:
            assert re.search(r'\bname=~"\$node"', target["expr"]), \
                f"{panel['title']} ignores the node variable: {target['expr']}"


def legends() -> list[tuple[str, str, str, str]]:
    """(dashboard, panel, PromQL, legend) of every panel target."""
    return [(board["title"], panel["title"], t["expr"], t.get("legendFormat", ""))
            for _, board in boards() for panel in board["panels"] for t in panel["targets"]]


def test_dashboards_show_nodes_by_name() -> None:
    """People read names: no legend shows a node id or a scrape address; series of one node
    are labelled {{name}}, and the gateway's per-node series (by node_id) are joined to it."""
    for board, panel, expr, legend in legends():
        assert "{{node_id}}" not in legend and "{{instance}}" not in legend, f"{board} / {panel}: {legend!r}"
        if re.search(r"by \([^)]*\bnode_id\b", expr):
            assert "group_left(name)" in expr and "{{name}}" in legend, f"{board} / {panel}: {expr}"
    node_legends = [legend for board, _, _, legend in legends() if board == "EdgeMesh node"]
    assert all("{{name}}" in legend or "{{method}}" in legend for legend in node_legends), node_legends


def test_overview_shows_placement_changes() -> None:
    panels = {p["title"]: p for p in json.loads((DASHBOARDS / "edgemesh-overview.json").read_text())["panels"]}
    changes = [t["expr"] for t in panels["Placement changes"]["targets"]]
    assert any("edgemesh_replans_total" in e and "by (reason)" in e for e in changes), changes
    # A labelled counter is born at 1: the initial placement (once per gateway) is counted as born.
    assert all("unless edgemesh_replans_total offset" in e for e in changes), changes
    converge = [t["expr"] for t in panels["Placement convergence time"]["targets"]]
    assert {q for e in converge for q in re.findall(r"histogram_quantile\(([\d.]+)", e)} == {"0.5", "0.95"}
    assert all("edgemesh_placement_converge_seconds_bucket" in e for e in converge)
    assert panels["Placement convergence time"]["fieldConfig"]["defaults"]["unit"] == "s"
    overview = json.loads((DASHBOARDS / "edgemesh-overview.json").read_text())
    assert any("edgemesh_replans_total" in a.get("expr", "") for a in overview["annotations"]["list"])


def test_dashboards_are_generated_from_the_script(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts" / "gen_dashboards.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=60)
    for path in DASHBOARDS.glob("*.json"):
        assert (tmp_path / path.name).read_text() == path.read_text(), \
            f"{path.name} is stale: run scripts/gen_dashboards.py"


def test_metric_name_parser() -> None:
    """The parser the dashboard and rule checks rely on."""
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(a_bucket{x="y"}[$__rate_interval])))') == {
        "a_bucket"}
    assert metric_names("(b unless b offset $__rate_interval) or increase(b[1m])") == {"b"}
    assert metric_names('max(c) and on() group(d) > 0 or e{s=~"x|y"} == 1e3') == {"c", "d", "e"}
    assert metric_names("max_over_time(sum by (job, instance) (f)[1h:]) < bool 2") == {"f"}
    assert metric_names("g == 0\nor\n(h unless on(i) (j == 1))") == {"g", "h", "j"}
    with pytest.raises(ValueError):
        metric_names("rat(x[1m])")
