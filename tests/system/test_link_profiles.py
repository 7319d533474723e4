"""The emulated home-network links of TestNet (tests/harness/link_profiles.py), measured from
inside the namespaces with tests/system/link_probe.py: host 0 measures host 1, both on the
same profile, so a round trip pays the profile's one-way delay twice.

- ethernet: a round trip under 1.5 ms; wifi: 3-7 ms, and loopback inside a shaped host stays
  fast; bad-wifi: 12-28 ms (0.75x-1.75x twice the delay: keeping packet order makes a packet
  behind another wait for it, so bursts pay more than the mean jitter);
- bad-wifi loses 3 % of UDP datagrams (unicast and mDNS-group multicast), silently (the
  sender's sendto never fails), and never reorders them, although its +-6 ms jitter is far
  above the datagrams' 0.5 ms spacing;
- a rate-limited link carries about its rate;
- a dead delayer drops nothing (--queue-bypass);
- after close() no namespace, link, iptables rule, qdisc or delayer process is left.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.transport import hidden_wire
from tests.conftest import REPO
from tests.harness.link_profiles import PROFILES, LinkProfile
from tests.system.netns import TestNet, unavailable_link_reason

_UNAVAILABLE = unavailable_link_reason()
if _UNAVAILABLE:
    pytest.skip(_UNAVAILABLE, allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.netns]

PORT = 7100
RTT_BAND = (0.75, 1.75)  # x (2 x one-way delay): the median round trip of a same-profile pair
PROBE_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestNet]:
    """Two hosts; host 1 runs the probe's server."""
    with TestNet(hosts=2, workdir=tmp_path_factory.mktemp("links")) as net:
        net.popen(1, [sys.executable, "-m", "tests.system.link_probe", "serve", net.hosts[1].address, str(PORT)],
                  cwd=REPO, stdin=subprocess.DEVNULL)
        yield net


def shape_both(net: TestNet, profile: LinkProfile) -> None:
    for i in range(len(net.hosts)):
        net.shape(i, profile)


def probe(net: TestNet, frm: int, to: int, samples: int, *extra: str) -> dict[str, Any]:
    process = net.popen(frm, [sys.executable, "-m", "tests.system.link_probe", "measure", net.hosts[to].address,
                              str(PORT), "--samples", str(samples), *extra],
                        cwd=REPO, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    out, _ = process.communicate(timeout=PROBE_TIMEOUT_S)
    assert process.returncode == 0
    result: dict[str, Any] = json.loads(out)
    return result


def medians(result: dict[str, Any]) -> tuple[float, float]:
    return statistics.median(result["connect_ms"]), statistics.median(result["request_ms"])


def report(what: str, text: str) -> None:
    print(f"\n{what}: {text}")


def test_ethernet_round_trip_is_below_the_least_wifi_takes(net: TestNet) -> None:
    """0.4 ms of delay a round trip, plus the delayer's wake-ups on a shared 2-core machine
    (measured 0.7-1.7 ms): well below the shortest round trip the wifi profile passes with."""
    shape_both(net, PROFILES["ethernet"])
    connect, request = medians(probe(net, 0, 1, 200))
    report("ethernet", f"median connect {connect:.2f} ms, request/response {request:.2f} ms")
    least_wifi = 2 * PROFILES["wifi"].delay_ms * RTT_BAND[0]
    assert connect < least_wifi and request < least_wifi


def test_wifi_round_trip_is_3_to_7_ms_and_loopback_is_not_delayed(net: TestNet) -> None:
    wifi = PROFILES["wifi"]
    shape_both(net, wifi)
    result = probe(net, 0, 1, 150, "--udp", "1000")
    connect, request = medians(result)
    local_connect, local_request = medians(probe(net, 1, 1, 100))  # host 1 to its own address: lo
    report("wifi", f"median connect {connect:.2f} ms, request/response {request:.2f} ms; "
                   f"inside a host {local_request:.3f} ms; udp {result['udp']}")
    low, high = (2 * wifi.delay_ms * k for k in RTT_BAND)
    assert low <= connect <= high and low <= request <= high
    assert local_connect < 1.0 and local_request < 1.0
    # multicast to mDNS's group crosses the shaped link (less its 0.5 % loss)
    assert result["udp"]["multicast"]["received"] >= 0.97 * result["udp_sent"]


@pytest.mark.parametrize(("profile", "picked"), [("ethernet", "f32"), ("wifi", "f16"), ("bad-wifi", "q8_0")])
def test_activation_dtype_auto_picks_by_the_profile_from_the_kernels_round_trip(net: TestNet, profile: str,
                                                                                picked: str) -> None:
    """What --activation-dtype auto sends hidden states as on each link: chosen per connection
    from the least round trip the kernel measured (hidden_wire.tcp_rtt_s). A connection's few
    round trips are a sample of the jitter, so a bad-wifi connection may see one that looks
    like wifi; nine in ten pick the profile's dtype."""
    shape_both(net, PROFILES[profile])
    rtts = probe(net, 0, 1, 40)["kernel_rtt_ms"]
    assert len(rtts) == 40
    picks = collections.Counter(hidden_wire.dtype_for_link("auto", rtt / 1e3) for rtt in rtts)
    report(f"{profile} kernel min_rtt", f"{min(rtts):.2f}-{max(rtts):.2f} ms (median {statistics.median(rtts):.2f}): "
                                        f"{dict(picks)}")
    assert picks[picked] >= 0.9 * len(rtts), picks


def test_bad_wifi_loses_3_percent_silently_in_order(net: TestNet) -> None:
    bad = PROFILES["bad-wifi"]
    shape_both(net, bad)
    sent = 3000
    result = probe(net, 0, 1, 40, "--udp", str(sent), "--udp-rate", "2000")
    connect, request = medians(result)
    udp = result["udp"]
    received = udp["unicast"]["received"] + udp["multicast"]["received"]
    loss_pct = 100 * (1 - received / (2 * sent))
    report("bad-wifi", f"median connect {connect:.2f} ms, request/response {request:.2f} ms; "
                       f"UDP loss {loss_pct:.2f} % of {2 * sent}; {udp}")
    low, high = (2 * bad.delay_ms * k for k in RTT_BAND)
    assert low <= request <= high and low <= connect <= high
    # 6000 datagrams at 3 %: the binomial's standard deviation is 0.22 %, so this is 4.5 sigma
    assert 2.0 <= loss_pct <= 4.0
    assert result["udp_send_errors"] == 0  # lost on the link, not refused to the sender
    assert udp["unicast"]["reordered"] == 0 and udp["multicast"]["reordered"] == 0


def test_a_rate_limited_link_carries_about_its_rate(net: TestNet) -> None:
    rate = LinkProfile("30-mbit", delay_ms=0.2, jitter_ms=0.0, loss_pct=0.0, rate_mbit=30.0)
    shape_both(net, rate)
    size = 2_000_000
    result = probe(net, 0, 1, 1, "--bulk", str(size))
    mbit = size * 8 / result["bulk_s"] / 1e6
    report("rate", f"{size} bytes in {result['bulk_s']:.2f} s: {mbit:.1f} Mbit/s on a {rate.rate_mbit} Mbit/s link")
    assert 0.6 * rate.rate_mbit <= mbit <= 1.05 * rate.rate_mbit


def test_a_dead_delayer_lets_packets_through_undelayed(net: TestNet) -> None:
    """--queue-bypass: with no delayer bound, a host's packets pass as if unshaped (here host
    0's; host 1 still delays its own), none are dropped."""
    wifi = PROFILES["wifi"]
    shape_both(net, wifi)
    delayer = net.shaped[0].delayer
    assert delayer is not None
    os.kill(delayer.pid, signal.SIGKILL)
    delayer.wait(timeout=10)
    result = probe(net, 0, 1, 50, "--udp", "500")
    _connect, request = medians(result)
    report("dead delayer", f"median request/response {request:.2f} ms; udp {result['udp']}")
    assert request < 2 * wifi.delay_ms  # one way delayed, the other not
    # nothing held by the dead delayer is lost for good: 500 datagrams, 0.5 % loss each way
    assert result["udp"]["unicast"]["received"] >= 0.97 * 500
    net.unshape(0)  # the rules and qdisc go; the delayer is already gone


def _leftovers(tag: str, pids: list[int]) -> list[str]:
    found = []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"namespace {line}" for line in namespaces.splitlines() if tag in line]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {line[:60]}" for line in links.splitlines() if tag in line]
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    found += [f"qdisc {line}" for line in qdiscs.splitlines() if tag in line]
    rules = "".join(subprocess.run(["iptables", "-w", "-t", t, "-S"], capture_output=True, text=True).stdout
                    for t in ("filter", "mangle"))
    found += [f"rule {line}" for line in rules.splitlines() if tag in line]
    found += [f"delayer pid {pid}" for pid in pids if os.path.exists(f"/proc/{pid}")]
    return found


def _rules(net: TestNet, i: int) -> str:
    return "".join(subprocess.run(["ip", "netns", "exec", net.hosts[i].ns, "iptables", "-w", "-t", t, "-S", "OUTPUT"],
                                  capture_output=True, text=True, check=True).stdout for t in ("filter", "mangle"))


def _qdisc(net: TestNet, i: int) -> str:
    host = net.hosts[i]
    return subprocess.run(["ip", "netns", "exec", host.ns, "tc", "qdisc", "show", "dev", host.veth_ns],
                          capture_output=True, text=True, check=True).stdout


def test_links_given_at_start_and_close_leaves_nothing(tmp_path: Path) -> None:
    wifi, bad = PROFILES["wifi"], PROFILES["bad-wifi"]
    with TestNet(hosts=2, workdir=tmp_path, links={0: wifi}, profile=bad) as net:
        net.add_host()  # a host added later gets `profile` too
        assert [net.shaped[i].profile for i in range(3)] == [wifi, bad, bad]
        pids = net.delayer_pids()
        assert len(pids) == 3 and all(os.path.exists(f"/proc/{pid}") for pid in pids)
        for i in range(3):
            rules = _rules(net, i)
            assert "NFQUEUE" in rules and "--queue-bypass" in rules and "statistic" in rules, rules
            assert "tbf" in _qdisc(net, i)
        assert "rate 150Mbit" in _qdisc(net, 0) and "rate 30Mbit" in _qdisc(net, 1)
        net.unshape(2)
        assert "NFQUEUE" not in _rules(net, 2) and "statistic" not in _rules(net, 2)
        assert "tbf" not in _qdisc(net, 2)
        assert not os.path.exists(f"/proc/{pids[2]}") and len(net.delayer_pids()) == 2
        tag = net.tag
    assert _leftovers(tag, pids) == []
