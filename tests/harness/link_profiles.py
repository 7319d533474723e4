"""Emulated home-network links for the test network (tests/system/netns.py `TestNet.shape`).

A profile describes what one host's link does to the packets that host sends: each is held
`delay_ms` plus a uniform sample in [-jitter_ms, +jitter_ms] (packet order kept), `loss_pct`
of them are lost on the wire, and the link carries at most `rate_mbit`. The figures are the
one place these links are defined; tests and benchmarks import them by name.

The delay is added where the sender's packets leave (before its qdisc), where the sender's
TCP still counts them as queued on the host (likely its small-queue limit, TSQ): one bulk TCP
stream over a 2 ms link topped out near 100 Mbit/s here (55 with the wifi jitter), below
`rate_mbit`. Small messages, the pipeline's per-token traffic, are not affected.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinkProfile:
    name: str
    delay_ms: float  # one way, added to every packet the host sends
    jitter_ms: float  # uniform +-, packet order kept
    loss_pct: float
    rate_mbit: float


# A wired LAN: a switch hop and a NIC's interrupt moderation.
ETHERNET = LinkProfile("ethernet", delay_ms=0.2, jitter_ms=0.0, loss_pct=0.0, rate_mbit=1000.0)
# A good Wi-Fi 5/6 link in the same room: a few ms of air time and retries, a little loss.
WIFI = LinkProfile("wifi", delay_ms=2.0, jitter_ms=1.0, loss_pct=0.5, rate_mbit=150.0)
# A device two walls away on a busy 2.4 GHz channel.
BAD_WIFI = LinkProfile("bad-wifi", delay_ms=8.0, jitter_ms=6.0, loss_pct=3.0, rate_mbit=30.0)

PROFILES: dict[str, LinkProfile] = {p.name: p for p in (ETHERNET, WIFI, BAD_WIFI)}
