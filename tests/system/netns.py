"""A throw-away test network: network namespaces joined by a Linux bridge.

    with TestNet(hosts=5, workdir=tmp_path) as net:
        net.popen(0, [sys.executable, "-m", "mesh.cli", "node", "--host", net.hosts[0].address, ...])
        net.cut(0)   # the host's link goes down: its packets are silently dropped
        net.heal(0)

Layout (k is random per network, so concurrent runs on one machine do not collide):

    root namespace: bridge em-br<tag>, 198.18.<k>.1/24
    host i:         namespace em-<tag>-<i>, veth em<tag>h<i> (root side, on the bridge)
                    <-> em<tag>n<i> (inside), 198.18.<k>.<10+i>/24, lo up,
                    224.0.0.0/4 routed to the veth so that mDNS works

Every process is started with `ip netns exec NS ...` (which enters the namespace and execs
the command, so the Popen pid is the process itself) in a session of its own, tracked, and
ended by process group on exit (tests/harness/processes.py): SIGTERM and SIGCONT (in case a
test left it stopped), then SIGKILL, to it and to all it started. Then anything still in our
namespaces is killed, and every namespace, veth and the bridge is deleted, also when the
test failed half-way.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.harness import guards, processes

NET = ipaddress.ip_network("198.18.0.0/15")
FIRST_HOST = 10  # host i is 198.18.<k>.<FIRST_HOST + i>
SUBNET_LOCK = "/tmp/edgemesh-testnet-subnets.lock"
STOP_GRACE_S = 75.0  # a draining node may wait up to Timeouts.drain_s (60 s) for its streams


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why this machine cannot run netns tests (None when it can)."""
    if os.geteuid() != 0:
        return "network-namespace tests need root (ip netns add, veth, bridge)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"em-probe-{secrets.token_hex(3)}"
    try:
        added = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` could not run: {exc}"
    if added.returncode != 0:
        return f"`ip netns add` failed: {added.stderr.strip() or added.returncode}"
    _ip("netns", "del", probe, check=False)
    return None


def _subnets_in_use() -> set[int]:
    """Third octets of the 198.18.0.0/24..198.18.255.0/24 subnets already on this machine."""
    used: set[int] = set()
    out = _ip("-4", "-o", "addr", "show", check=False).stdout
    for line in out.splitlines():
        for word in line.split():
            if "/" in word and word.count(".") == 3:
                with contextlib.suppress(ValueError):
                    addr = ipaddress.ip_interface(word).ip
                    if addr in NET and str(addr).startswith("198.18."):
                        used.add(int(str(addr).split(".")[2]))
    return used


@dataclass
class Host:
    index: int
    ns: str
    address: str
    veth_root: str  # the bridge side: `cut` takes this one down
    veth_ns: str


class TestNet:
    """A bridge and N namespaces, each one host of a simulated LAN."""

    __test__ = False  # not a pytest test class

    def __init__(self, hosts: int, workdir: Path) -> None:
        self.workdir = workdir
        self.tag = secrets.token_hex(3)  # 6 hex digits: unique among parallel test workers; names stay <= 15 chars
        self.bridge = f"em-br{self.tag}"
        self._initial = hosts
        self.subnet = 0
        self.gateway_ip = ""  # the bridge's address in the root namespace
        self.hosts: list[Host] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._namespaces: list[str] = []
        self._links: list[str] = []
        self.owner = guards.current_owner()  # a class's or module's network owns what it starts

    # ------------------------------------------------------------------ set-up

    def __enter__(self) -> TestNet:
        try:
            self._create_bridge()
            for _ in range(self._initial):
                self.add_host()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _create_bridge(self) -> None:
        # Test workers run in parallel (pytest-xdist): the lock makes "find a free subnet" and
        # "take it" one step, so two networks never get the same 198.18.<k>.0/24.
        with open(SUBNET_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            free = sorted(set(range(256)) - _subnets_in_use())
            if not free:
                raise RuntimeError("no free 198.18.<k>.0/24 subnet on this machine")
            self.subnet = secrets.choice(free)
            self.gateway_ip = f"198.18.{self.subnet}.1"
            _ip("link", "add", self.bridge, "type", "bridge")
            self._links.append(self.bridge)
            # No STP delay, no multicast snooping surprises: a plain hub.
            _ip("link", "set", self.bridge, "type", "bridge", "forward_delay", "0", "mcast_snooping", "0",
                check=False)
            _ip("addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_host(self) -> Host:
        """One more namespace on the bridge (also after start-up: a device joining the LAN)."""
        i = len(self.hosts)
        if FIRST_HOST + i > 254:
            raise RuntimeError("too many hosts for one /24")
        ns = f"em-{self.tag}-{i}"
        root_side, ns_side = f"em{self.tag}h{i}", f"em{self.tag}n{i}"
        address = f"198.18.{self.subnet}.{FIRST_HOST + i}"
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("link", "add", root_side, "type", "veth", "peer", "name", ns_side)
        self._links.append(root_side)  # deleting one end deletes the pair
        _ip("link", "set", ns_side, "netns", ns)
        _ip("link", "set", root_side, "master", self.bridge)
        _ip("link", "set", root_side, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", ns_side)
        _ip("-n", ns, "link", "set", ns_side, "up")
        _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", ns_side)
        host = Host(i, ns, address, root_side, ns_side)
        self.hosts.append(host)
        return host

    # ------------------------------------------------------------------ faults

    def cut(self, i: int) -> None:
        """Take host i's link down at the bridge: its packets vanish, nothing is reset."""
        _ip("link", "set", self.hosts[i].veth_root, "down")

    def heal(self, i: int) -> None:
        _ip("link", "set", self.hosts[i].veth_root, "up")

    # ------------------------------------------------------------------ processes

    def popen(self, i: int, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start argv inside host i's namespace, in its own session; its group is ended on exit."""
        process = processes.popen(["ip", "netns", "exec", self.hosts[i].ns, *argv], **kwargs)
        self._procs.append(process)
        guards.adopt(self.owner, process.pid)
        return process

    @staticmethod
    def stop_process(process: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM and SIGCONT (should a test have left it stopped) to its group, then SIGKILL."""
        processes.stop_group(process, grace_s=grace_s)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        errors: list[str] = []
        processes.stop_groups(list(reversed(self._procs)), STOP_GRACE_S)  # all at once, so drains overlap
        self._procs.clear()
        for ns in self._namespaces:
            # Anything still inside our namespaces was started by our processes (their names
            # are unique to this network): end it by pid too, so nothing outlives the test.
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for ns in reversed(self._namespaces):
            result = _ip("netns", "del", ns, check=False)
            if result.returncode != 0:
                errors.append(f"netns {ns}: {result.stderr.strip()}")
        self._namespaces.clear()
        for link in reversed(self._links):
            # veths vanish with their namespace; only what is left needs deleting
            if _ip("link", "show", link, check=False).returncode == 0:
                result = _ip("link", "del", link, check=False)
                # the kernel may finish removing a veth of a deleted namespace between the two calls
                if result.returncode != 0 and "Cannot find device" not in result.stderr:
                    errors.append(f"link {link}: {result.stderr.strip()}")
        self._links.clear()
        if errors:
            raise RuntimeError("network clean-up failed: " + "; ".join(errors))
