"""README.md is the newcomer's contract: its commands exist and its metric list is complete."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

from mesh.cli import build_parser
from mesh.metrics import GatewayMetrics, NodeMetrics
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _metric_names() -> set[str]:
    names = set()
    for catalogue in (NodeMetrics, GatewayMetrics):
        registry = CollectorRegistry()
        catalogue(registry)
        for family in registry.collect():
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_every_metric_is_listed_with_the_prefix() -> None:
    names = _metric_names()
    assert all(n.startswith("edgemesh_") for n in names)
    listed = set(re.findall(r"^\| `(edgemesh_[a-z_]+)`", README, re.MULTILINE))
    assert names - listed == set(), f"metrics missing from README: {sorted(names - listed)}"
    assert listed - names == set(), f"README lists metrics that do not exist: {sorted(listed - names)}"


def test_the_two_commands_and_ci_agree() -> None:
    assert "make up " in README and "make test " in README
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^up: setup$", makefile, re.MULTILINE) and re.search(r"^test: setup", makefile, re.MULTILINE)
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_cli_commands_named_in_readme_exist() -> None:
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    named = set(re.findall(r"`edgemesh ([a-z]+)", README))
    assert named <= commands, named - commands
