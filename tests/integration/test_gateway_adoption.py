"""A gateway that starts after the nodes have their roles adopts them: nothing is reloaded.

Three plain `edgemesh node` processes with a memory limit too small for the whole model,
a gateway that places a 3-stage pipeline on them, then that gateway goes away (cleanly,
and then by SIGKILL) and a new one starts: it serves at once from what the nodes hold,
takes over the placement claims (at once after a clean stop, after the lease lapses after
a kill), and the nodes receive no further load call.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, Launcher, Proc, gateway_url, load_calls

pytestmark = pytest.mark.slow

PROMPT = "The history of the printing press"
CLAIM_TTL_S = 15.0  # mesh.placement.controller.ControllerSettings.claim_ttl_s


def node_load_calls(nodes: list[Proc]) -> int:
    """LoadStage + LoadModel calls every node has served, from its own metrics."""
    return int(sum(load_calls(httpx.get(f"http://127.0.0.1:{n.ready[2]}/metrics", timeout=10).text) for n in nodes))


def wait_view(url: str, predicate: Any, what: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = httpx.get(f"{url}/api/cluster", timeout=10).json()
        if predicate(view):
            return view
        time.sleep(0.2)
    raise AssertionError(f"{what} not seen within {timeout}s: {view.get('placement')}")


def complete(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 16, "temperature": 0},
                      timeout=120)


def test_a_later_gateway_adopts_what_the_nodes_hold(launcher: Launcher, default_model: Path,
                                                      reference_llm: Any) -> None:
    nodes = [launcher.node(f"dev-{i}", default_model, "--memory-limit", "60MB") for i in (1, 2, 3)]
    peers = [a for n in nodes for a in ("--peer", f"127.0.0.1:{n.ready[1]}")]
    reference_llm.reset()
    expected = reference_llm.create_completion(PROMPT, max_tokens=16, temperature=0)["choices"][0]["text"]

    first = launcher.gateway("gw-1", default_model, "--no-discovery", *peers)
    url = gateway_url(first)
    view = wait_view(url, lambda v: v["placement"]["converged"] and v["placements"], "the first placement")
    assert [len(p["stages"]) for p in view["placements"]] == [3]
    assert view["placement"]["active"] and view["placement"]["change"] in ("initial", "keep")
    assert all(n["role"] == "stage" and n["role_reason"].startswith("stage ") for n in view["nodes"])
    placed = view["placements"]
    loads = node_load_calls(nodes)
    assert loads == 3
    assert complete(url).json()["choices"][0]["text"] == expected

    status = subprocess.run([sys.executable, "-m", "mesh.cli", "status", "--url", url], capture_output=True,
                            text=True, timeout=60, cwd=REPO)
    assert status.returncode == 0 and "dev-1: stage " in status.stdout, status.stdout
    explained = subprocess.run([sys.executable, "-m", "mesh.cli", "plan", "--url", url], capture_output=True,
                               text=True, timeout=60, cwd=REPO)
    assert explained.returncode == 0, explained.stderr
    assert "(places the model)" in explained.stdout and "pipeline: dev-" in explained.stdout
    assert "cannot hold a replica" in explained.stdout  # the planner's reasons, from the nodes' reports

    # A clean stop gives the claims up: the next gateway places at once, and loads nothing.
    assert first.stop() == 0
    second = launcher.gateway("gw-2", default_model, "--no-discovery", *peers)
    url = gateway_url(second)
    view = wait_view(url, lambda v: v["placements"] and v["placement"]["active"], "the adopted placement", 20)
    assert view["placements"] == placed
    assert complete(url).json()["choices"][0]["text"] == expected

    # A gateway killed outright leaves its claims to lapse: the next one serves from what the
    # nodes hold meanwhile, only routes, and takes over once the lease is gone.
    second.stop(signal.SIGKILL)
    started = time.monotonic()
    third = launcher.gateway("gw-3", default_model, "--no-discovery", *peers)
    url = gateway_url(third)
    view = wait_view(url, lambda v: bool(v["placements"]) and v["placement"]["change"] is not None,
                     "routes to what the nodes hold", 20)
    assert view["placements"] == placed
    assert complete(url).json()["choices"][0]["text"] == expected
    if time.monotonic() - started < CLAIM_TTL_S - 3:
        assert not view["placement"]["active"] and view["placement"]["rival"]
    view = wait_view(url, lambda v: v["placement"]["active"] and v["placement"]["converged"],
                     "the lapsed claims taken over", CLAIM_TTL_S + 15)
    assert view["placements"] == placed
    assert node_load_calls(nodes) == loads, "a gateway that adopts the nodes' roles reloaded something"
