"""A packet counter for one network namespace: `python -m tests.system.egress_capture OUT SUBNET`.

Run inside a namespace (ip netns exec), it reads every frame of every interface there
(AF_PACKET, the kernel's own copy) and appends to OUT, one JSON line each, every frame that
leaves for somewhere other than loopback, the mesh's SUBNET (a.b.c.0/24) or mDNS, and
every DNS query (UDP or TCP port 53, on any interface, loopback included). The kernel's own
link-local chatter (IGMP and MLD reports for the mDNS group, IPv6 router and neighbour
discovery) is allowed: it is not a process reaching out. It writes "ready" first, and runs
until SIGTERM.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
import struct
import sys
import time
from typing import Any

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
MDNS_PORT = 5353
DNS_PORT = 53
MDNS_V4 = ipaddress.ip_address("224.0.0.251")
LINK_LOCAL_V4 = ipaddress.ip_network("224.0.0.0/24")  # IGMP reports go here
LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
LINK_LOCAL_V6 = (ipaddress.ip_network("fe80::/10"), ipaddress.ip_network("ff02::/16"))


def classify(frame: bytes, outgoing: bool, subnet: ipaddress.IPv4Network) -> dict[str, Any] | None:
    """Why a frame is egress (a dict to record), or None when it is the mesh's own."""
    if len(frame) < 14:
        return None
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == 0x0806 and len(frame) >= 42:  # ARP: a host asking where an address is
        target = ipaddress.ip_address(frame[38:42])
        if outgoing and target not in subnet and target not in LOOPBACK_V4:
            return {"what": "arp", "dst": str(target)}
        return None
    if ethertype == 0x0800 and len(frame) >= 34:
        ihl = (frame[14] & 0x0F) * 4
        proto = frame[23]
        dst = ipaddress.ip_address(frame[30:34])
        ports = _ports(frame, 14 + ihl, proto)
        if ports is not None and DNS_PORT in ports:
            return {"what": "dns", "dst": str(dst), "ports": list(ports), "query": _dns_name(frame, 14 + ihl, proto)}
        if not outgoing or dst in subnet or dst in LOOPBACK_V4:
            return None
        if dst == MDNS_V4 and ports is not None and MDNS_PORT in ports:
            return None
        if dst in LINK_LOCAL_V4 and proto == 2:  # IGMP, the kernel's group membership reports
            return None
        return {"what": "ipv4", "dst": str(dst), "proto": proto, "ports": list(ports or ())}
    if ethertype == 0x86DD and len(frame) >= 54:
        proto = frame[20]
        dst = ipaddress.ip_address(frame[38:54])
        ports = _ports(frame, 54, proto)
        if ports is not None and DNS_PORT in ports:
            return {"what": "dns", "dst": str(dst), "ports": list(ports), "query": _dns_name(frame, 54, proto)}
        if not outgoing or dst.is_loopback or any(dst in net for net in LINK_LOCAL_V6):
            return None  # mDNS (ff02::fb), MLD, router and neighbour discovery
        return {"what": "ipv6", "dst": str(dst), "proto": proto, "ports": list(ports or ())}
    return None


def _dns_name(frame: bytes, offset: int, proto: int) -> str:
    """The name a UDP DNS query asks for (what the failure message should say), "" if unreadable."""
    if proto != 17:
        return ""
    labels, at = [], offset + 8 + 12  # UDP header, DNS header
    while at < len(frame) and frame[at] and len(labels) < 64:
        length = frame[at]
        labels.append(frame[at + 1:at + 1 + length].decode(errors="replace"))
        at += 1 + length
    return ".".join(labels)


def _ports(frame: bytes, offset: int, proto: int) -> tuple[int, int] | None:
    if proto not in (6, 17) or len(frame) < offset + 4:
        return None
    sport, dport = struct.unpack_from("!HH", frame, offset)
    return sport, dport


def main(out_path: str, subnet_text: str) -> None:
    subnet = ipaddress.ip_network(subnet_text)
    stop = False

    def end(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, end)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    sock.settimeout(0.2)
    frames = 0
    with open(out_path, "a", buffering=1) as out:
        out.write(json.dumps({"what": "ready"}) + "\n")
        while not stop:
            try:
                frame, address = sock.recvfrom(1 << 16)
            except TimeoutError:
                continue
            except InterruptedError:
                continue
            frames += 1
            interface, pkttype = address[0], address[2]
            # On loopback every frame shows twice (sent and received); judge the sent copy,
            # and on other interfaces what this host sends (received DNS answers count too).
            verdict = classify(frame, pkttype == PACKET_OUTGOING, subnet)
            if verdict is not None and (pkttype == PACKET_OUTGOING or verdict["what"] == "dns"):
                verdict.update(interface=interface, at=time.time())
                out.write(json.dumps(verdict) + "\n")
        out.write(json.dumps({"what": "end", "frames": frames}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
