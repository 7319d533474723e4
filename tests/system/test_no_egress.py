"""With no cloud configured, a whole EdgeMesh session sends nothing off the LAN (issue 17).

Three devices on a simulated LAN (tests/system/netns.py): two `edgemesh node` and an
`edgemesh gateway` that finds them by mDNS and places a 2-stage pipeline. Each device also
has a default route, to a sink namespace that forwards nothing: a process that reaches for
the internet (a model hub, a font CDN, a DNS resolver, telemetry) sends its packets there,
and nothing leaves this machine. A counter on every device (tests/system/egress_capture.py)
records every frame bound anywhere but loopback, the mesh's /24 and mDNS, and every DNS
query on any interface.

The session: start, placement, a completion and a streamed chat, `edgemesh status` and
`edgemesh model list` on the devices, the web page and its assets, /v1/models, then a
drain. Nothing may be counted. The control at the end: a datagram to a documentation
address and a DNS lookup, from one device, must be counted, so the counter can fail.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, Proc, wait_for_pipeline, wait_for_ready_file
from tests.system.netns import TestNet, _ip, unavailable_reason

_UNAVAILABLE = unavailable_reason()
if _UNAVAILABLE:
    pytest.skip(_UNAVAILABLE, allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.netns]

STATIC = REPO / "mesh" / "gateway" / "static"
# A reference the browser would fetch from another origin: src/href attributes, CSS url(),
# JavaScript imports and fetch() calls with an absolute http(s) or protocol-relative URL.
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//|"""
                      r"""(?:import|from|fetch\()\s*\(?\s*["'](?:https?:)?//""")
CONTROL = ("import socket\n"
           "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('203.0.113.9', 9))\n"
           "try:\n    socket.getaddrinfo('example.com', 443)\nexcept OSError:\n    pass\n")


@contextmanager
def sinks(net: TestNet) -> Iterator[None]:
    """A default route on every host, to a namespace that takes the packets and forwards none
    (a new namespace has forwarding off). Host i's link: 198.19.<k>.<4i+2> -> .<4i+1>."""
    sink = f"em-{net.tag}-sink"
    links: list[str] = []
    _ip("netns", "add", sink)
    try:
        _ip("-n", sink, "link", "set", "lo", "up")
        for host in net.hosts:
            inner, outer = f"em{net.tag}e{host.index}", f"em{net.tag}s{host.index}"
            near, far = f"198.19.{net.subnet}.{4 * host.index + 2}", f"198.19.{net.subnet}.{4 * host.index + 1}"
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            links.append(inner)
            _ip("link", "set", inner, "netns", host.ns)
            _ip("link", "set", outer, "netns", sink)
            _ip("-n", host.ns, "addr", "add", f"{near}/30", "dev", inner)
            _ip("-n", sink, "addr", "add", f"{far}/30", "dev", outer)
            _ip("-n", host.ns, "link", "set", inner, "up")
            _ip("-n", sink, "link", "set", outer, "up")
            _ip("-n", host.ns, "route", "add", "default", "via", far)
        yield
    finally:
        _ip("netns", "del", sink, check=False)  # takes its ends of the veths with it
        for link in links:
            if _ip("link", "show", link, check=False).returncode == 0:
                _ip("link", "del", link, check=False)


def start(net: TestNet, i: int, name: str, argv: list[str], workdir: Path, env: dict[str, str]) -> Proc:
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log_file:
        popen = net.popen(i, argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          env=env, cwd=REPO)
    return Proc(name, popen, log_path)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_whole_session_sends_nothing_off_the_lan(tmp_path: Path, default_model: Path) -> None:
    cluster_key, api_key = secrets.token_urlsafe(24), secrets.token_urlsafe(16)
    env = {**os.environ, "EDGEMESH_CLUSTER_KEY": cluster_key, "EDGEMESH_API_KEY": api_key,
           "OMP_WAIT_POLICY": "PASSIVE"}
    env = {k: v for k, v in env.items() if not k.lower().endswith("_proxy")}  # no proxy to reach for
    with TestNet(hosts=3, workdir=tmp_path) as net, sinks(net):
        subnet = f"198.18.{net.subnet}.0/24"
        counters, outputs = [], []
        for host in net.hosts:
            out = tmp_path / f"egress-{host.index}.jsonl"
            counters.append(start(net, host.index, f"counter-{host.index}",
                                  [sys.executable, "-m", "tests.system.egress_capture", str(out), subnet],
                                  tmp_path, env))
            outputs.append(out)
        deadline = time.monotonic() + 30
        while not all(o.exists() and '"ready"' in o.read_text() for o in outputs):
            assert time.monotonic() < deadline, "the packet counters did not start"
            time.sleep(0.1)

        nodes = []
        for i in (0, 1):
            ready = tmp_path / f"node-{i}.ready"
            proc = start(net, i, f"node-{i}", [
                sys.executable, "-m", "mesh.cli", "node", "--model", str(default_model), "--name", f"desk-{i}",
                "--host", net.hosts[i].address, "--port", "0", "--metrics-port", "0", "--step-port", "0",
                "--threads", "1", "--role", "stage", "--ready-file", str(ready)], tmp_path, env)
            nodes.append((proc, ready))
        gw_ready = tmp_path / "gateway.ready"
        gateway = start(net, 2, "gateway", [
            sys.executable, "-m", "mesh.cli", "gateway", "--model", str(default_model), "--host",
            net.hosts[2].address, "--port", "0", "--strategy", "pipeline", "--stages", "2",
            "--ready-file", str(gw_ready)], tmp_path, env)
        for proc, ready in nodes:
            proc.ready = wait_for_ready_file(proc, ready)
        gateway.ready = wait_for_ready_file(gateway, gw_ready)
        url = f"http://{gateway.ready[0]}:{gateway.ready[1]}"
        headers = {"Authorization": f"Bearer {api_key}"}
        wait_for_pipeline(url, 2, headers=headers)
        with httpx.Client(base_url=url, headers=headers, timeout=120, trust_env=False) as client:
            completion = client.post("/v1/completions", json={"prompt": "The river", "max_tokens": 8,
                                                              "temperature": 0})
            assert completion.status_code == 200, completion.text
            with client.stream("POST", "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "stream": True}) as chat:
                assert chat.status_code == 200
                assert "[DONE]" in "".join(chat.iter_text())
            assert client.get("/v1/models").status_code == 200

            # The web page and every file it may load (all of static/): it must work offline,
            # so none may name another origin to fetch from.
            for path in ["/", "/cluster", *(f"/static/{f.name}" for f in sorted(STATIC.iterdir()) if f.is_file())]:
                body = client.get(path)
                assert body.status_code == 200, path
                assert not EXTERNAL.search(body.text), (path, EXTERNAL.search(body.text))

        for i, argv in ((2, ["status", "--url", url, "--api-key", api_key]), (0, ["model", "list"])):
            tool = start(net, i, f"cli-{argv[0]}", [sys.executable, "-m", "mesh.cli", *argv], tmp_path, env)
            assert tool.popen.wait(timeout=120) == 0, tool.log()

        for proc in (gateway, *(p for p, _ in nodes)):
            TestNet.stop_process(proc.popen)
        session_end = time.time()

        control = start(net, 1, "control", [sys.executable, "-c", CONTROL], tmp_path, env)
        assert control.popen.wait(timeout=60) == 0, control.log()
        time.sleep(1.0)
        for counter in counters:
            TestNet.stop_process(counter.popen, grace_s=10)

    seen = [dict(r, host=i) for i, out in enumerate(outputs) for r in records(out)]
    assert all(any(r["what"] == "end" and r["frames"] > 0 for r in records(out)) for out in outputs), \
        "a packet counter did not see its device's traffic"
    leaks = [r for r in seen if r["what"] not in ("ready", "end") and r["at"] < session_end]
    caught = [r for r in seen if r["what"] not in ("ready", "end") and r["at"] >= session_end]
    assert not leaks, f"packets left the LAN (or DNS was asked) during the session: {leaks[:20]}"
    # The control: the counter sees a packet bound off the LAN, and a DNS query.
    assert any(r["host"] == 1 and r.get("dst") == "203.0.113.9" for r in caught), caught
    assert any(r["host"] == 1 and r["what"] == "dns" for r in caught), caught
    for proc in (gateway, *(p for p, _ in nodes)):
        assert "Traceback" not in proc.log(), proc.log()[-3000:]
