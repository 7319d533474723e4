"""A throw-away test network: network namespaces joined by a Linux bridge.

    with TestNet(hosts=5, workdir=tmp_path) as net:
        net.popen(0, [sys.executable, "-m", "mesh.cli", "node", "--host", net.hosts[0].address, ...])
        net.cut(0)   # the host's link goes down: its packets are silently dropped
        net.heal(0)
        net.shape(1, PROFILES["wifi"])   # host 1's link: Wi-Fi latency, jitter, loss and rate
        net.unshape(1)

    TestNet(hosts=3, workdir=tmp_path, links={0: PROFILES["bad-wifi"]})  # per host, from the start
    TestNet(hosts=3, workdir=tmp_path, profile=PROFILES["wifi"])        # every host, also added ones

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

Emulated links (`shape`; the kernel here has no netem, see tests/harness/link_profiles.py):
a profile acts on the packets a host SENDS on its veth, so a one-way hop from host a to
host b pays a's profile, and a round trip pays a's one way and b's the other. Inside the
host's namespace:
- delay and jitter: an iptables `mangle` OUTPUT rule on the veth sends each packet to an
  NFQUEUE (number QUEUE_BASE + i, --queue-bypass so that packets pass should the delayer be
  gone) read by tests/harness/link_delayer.py, started in that namespace with the network's
  other processes and ended by pid on unshape/close;
- loss: a `filter` OUTPUT rule, `-m statistic --mode random --probability p -j DROP`. The
  filter table comes after mangle, so it sees a packet when the delayer lets it go: the drop
  happens after the sender's send() returned, silently, as on the air (a drop in the same
  pass as the send would fail the send with EPERM, and TCP would just retry it);
- rate: a tbf qdisc at the root of the veth.
Only the veth is shaped: loopback inside a namespace is not (a host talking to its own
address goes over lo). Multicast (mDNS) leaves by the veth too and is delayed and lossy like
everything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.harness import guards, processes
from tests.harness.link_profiles import LinkProfile

NET = ipaddress.ip_network("198.18.0.0/15")
FIRST_HOST = 10  # host i is 198.18.<k>.<FIRST_HOST + i>
SUBNET_LOCK = "/tmp/edgemesh-testnet-subnets.lock"
STOP_GRACE_S = 75.0  # a draining node may wait up to Timeouts.drain_s (60 s) for its streams
REPO = Path(__file__).resolve().parents[2]
QUEUE_BASE = 100  # host i's packets go to NFQUEUE QUEUE_BASE + i (queues are per namespace; unique anyway)
DELAYER_START_S = 15.0
TBF_LATENCY_MS = 50  # how long a packet may wait in the rate limiter before it is dropped (its queue size)


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


def _netns_run(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` in {ns} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@functools.cache
def unavailable_link_reason() -> str | None:
    """Why this machine cannot emulate links (`TestNet.shape`), None when it can: iptables with
    NFQUEUE and statistic, tc tbf, and the NetfilterQueue module, tried in a namespace of
    their own."""
    reason = unavailable_reason()
    if reason:
        return reason
    for tool, package in (("iptables", "iptables"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian package {package}; `make test-tools` installs it)"
    try:
        import netfilterqueue  # noqa: F401
    except ImportError as exc:
        return (f"the NetfilterQueue module is missing ({exc}): `make test-links` installs it, after "
                "`make test-tools` installed libnetfilter-queue-dev")
    probe = f"em-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "em-pa", "type", "veth", "peer", "name", "em-pb")
        for argv in (["iptables", "-w", "-t", "mangle", "-A", "OUTPUT", "-o", "em-pa", "-j", "NFQUEUE",
                      "--queue-num", "1", "--queue-bypass"],
                     ["iptables", "-w", "-A", "OUTPUT", "-o", "em-pa", "-m", "statistic", "--mode", "random",
                      "--probability", "0.5", "-j", "DROP"],
                     ["tc", "qdisc", "add", "dev", "em-pa", "root", "tbf", "rate", "10mbit", "burst", "16kb",
                      "latency", "50ms"],
                     [sys.executable, "-c", "from netfilterqueue import NetfilterQueue as Q; q = Q(); "
                                            "q.bind(1, lambda p: None); q.unbind()"]):
            result = _netns_run(probe, *argv, check=False)
            if result.returncode != 0:
                return f"`{' '.join(argv[:6])} ...` failed in a namespace: {result.stderr.strip()[-300:]}"
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"link emulation could not be tried: {exc}"
    finally:
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


@dataclass
class Shaping:
    """What `shape` installed on one host: undone by `unshape`."""

    profile: LinkProfile
    delayer: subprocess.Popen[bytes] | None
    rules: list[list[str]]  # ["-t", table, chain, *match and target]: see _rule_argv
    qdisc: bool


def _rule_argv(op: str, rule: list[str]) -> list[str]:
    """["-t", table, chain, *spec] -> iptables arguments that append (-A) or delete (-D) it."""
    flag, table, chain, *spec = rule
    return [flag, table, op, chain, *spec]


class TestNet:
    """A bridge and N namespaces, each one host of a simulated LAN."""

    __test__ = False  # not a pytest test class

    def __init__(self, hosts: int, workdir: Path, *, links: dict[int, LinkProfile] | None = None,
                 profile: LinkProfile | None = None) -> None:
        """`links`: a profile per host index, applied as the host is added; `profile`: the one
        of every host without an entry in `links`, including hosts added later."""
        self.workdir = workdir
        self.links = dict(links or {})
        self.profile = profile
        self.shaped: dict[int, Shaping] = {}
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
        wanted = self.links.get(i, self.profile)
        if wanted is not None:
            self.shape(i, wanted)
        return host

    # ------------------------------------------------------------------ faults

    def cut(self, i: int) -> None:
        """Take host i's link down at the bridge: its packets vanish, nothing is reset."""
        _ip("link", "set", self.hosts[i].veth_root, "down")

    def heal(self, i: int) -> None:
        _ip("link", "set", self.hosts[i].veth_root, "up")

    # ------------------------------------------------------------------ emulated links

    def shape(self, i: int, profile: LinkProfile, seed: int | None = None) -> None:
        """Host i's link behaves as `profile` for what host i sends (see the module's docstring);
        replaces the profile it had. `seed`: of the delayer's jitter (default: the host index)."""
        self.unshape(i)
        host = self.hosts[i]
        shaping = Shaping(profile, None, [], False)
        self.shaped[i] = shaping  # before anything is installed: unshape removes what got in
        if profile.delay_ms > 0 or profile.jitter_ms > 0:
            queue = QUEUE_BASE + i
            shaping.delayer = self._start_delayer(i, queue, profile, i if seed is None else seed)
            self._add_rule(host, shaping, ["-t", "mangle", "OUTPUT", "-o", host.veth_ns, "-j", "NFQUEUE",
                                           "--queue-num", str(queue), "--queue-bypass"])
        if profile.loss_pct > 0:
            self._add_rule(host, shaping, ["-t", "filter", "OUTPUT", "-o", host.veth_ns, "-m", "statistic",
                                           "--mode", "random", "--probability", f"{profile.loss_pct / 100:.6f}",
                                           "-j", "DROP"])
        if profile.rate_mbit > 0:
            rate_bytes_s = profile.rate_mbit * 1e6 / 8
            burst = max(int(rate_bytes_s / 1000), 16 * 1024)  # a ms at full rate; at least a few full packets
            _netns_run(host.ns, "tc", "qdisc", "replace", "dev", host.veth_ns, "root", "tbf",
                       "rate", f"{profile.rate_mbit}mbit", "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms")
            shaping.qdisc = True

    def unshape(self, i: int) -> None:
        """Host i's link back to a plain veth: rules, qdisc and delayer removed."""
        shaping = self.shaped.pop(i, None)
        if shaping is None:
            return
        host = self.hosts[i]
        errors = []
        for rule in reversed(shaping.rules):
            result = _netns_run(host.ns, "iptables", "-w", *_rule_argv("-D", rule), check=False)
            if result.returncode != 0:
                errors.append(result.stderr.strip())
        if shaping.qdisc:
            result = _netns_run(host.ns, "tc", "qdisc", "del", "dev", host.veth_ns, "root", check=False)
            if result.returncode != 0:
                errors.append(result.stderr.strip())
        if shaping.delayer is not None:
            self._procs.remove(shaping.delayer)
            processes.stop_group(shaping.delayer, grace_s=10)
        if errors:
            raise RuntimeError(f"unshaping host {i}: " + "; ".join(errors))

    def delayer_pids(self) -> list[int]:
        return [s.delayer.pid for s in self.shaped.values() if s.delayer is not None]

    def _add_rule(self, host: Host, shaping: Shaping, rule: list[str]) -> None:
        _netns_run(host.ns, "iptables", "-w", *_rule_argv("-A", rule))
        shaping.rules.append(rule)

    def _start_delayer(self, i: int, queue: int, profile: LinkProfile, seed: int) -> subprocess.Popen[bytes]:
        ready = self.workdir / f"link-delayer-{self.tag}-{i}.ready"
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "tests.harness.link_delayer", "--queue", str(queue),
                "--delay-ms", str(profile.delay_ms), "--jitter-ms", str(profile.jitter_ms), "--seed", str(seed),
                "--ready-file", str(ready)]
        with open(self.workdir / f"link-delayer-{self.tag}-{i}.log", "ab") as log:
            process = self.popen(i, argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
        deadline = time.monotonic() + DELAYER_START_S
        while not (ready.exists() and ready.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                processes.stop_group(process, grace_s=5)
                self._procs.remove(process)
                log_text = (self.workdir / f"link-delayer-{self.tag}-{i}.log").read_text(errors="replace")
                raise RuntimeError(f"the link delayer of host {i} did not start:\n{log_text[-2000:]}")
            time.sleep(0.02)
        return process

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
        delayers = [s.delayer for s in self.shaped.values() if s.delayer is not None]
        others = [p for p in self._procs if p not in delayers]
        processes.stop_groups(list(reversed(others)), STOP_GRACE_S)  # all at once, so drains overlap
        # The links last as long as what runs over them; their rules and qdiscs go with the
        # namespaces below, the delayers are ended here, by pid.
        processes.stop_groups(delayers, 10)
        self._procs.clear()
        self.shaped.clear()
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
