"""Measure a TestNet link from inside the namespaces (tests/system/test_link_profiles.py).

    python -m tests.system.link_probe serve HOST PORT
        TCP: each connection answers lines: "ping" -> "pong", "stats" -> the UDP tally (JSON).
        UDP (same port, also multicast group MDNS_GROUP): datagrams "<seq> <kind>" tallied per
        kind: how many arrived, how many arrived after a higher sequence number (reordered).
    python -m tests.system.link_probe measure HOST PORT --samples N [--udp N] [--udp-rate R]
        N times: connect, "ping", wait for "pong" (new connection each time): the connect and
        the request/response times. Then N UDP datagrams of each kind (unicast to HOST, multicast
        to MDNS_GROUP) at R per second, and the server's tally; then, with --bulk B, the time
        to download B bytes over TCP ("bulk B" -> B bytes and a newline). One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import secrets
import selectors
import socket
import struct
import sys
import time
from typing import Any

from mesh.transport import hidden_wire

MDNS_GROUP = "224.0.0.251"  # mDNS's group: multicast leaves by the shaped veth like any packet
UDP_SIZE = 200


class Tally:
    def __init__(self) -> None:
        self.kinds: dict[str, dict[str, int]] = {}

    def add(self, kind: str, seq: int) -> None:
        t = self.kinds.setdefault(kind, {"received": 0, "reordered": 0, "highest": -1})
        t["received"] += 1
        if seq < t["highest"]:
            t["reordered"] += 1
        t["highest"] = max(t["highest"], seq)


def serve(host: str, port: int) -> None:
    """One thread, one selector: on two shared cores a thread per connection (and its start-up
    handshake with the GIL) would add milliseconds of scheduling to every sample."""
    tally = Tally()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    udp.bind(("", port))  # the wildcard: unicast to HOST and the group's datagrams
    membership = struct.pack("4s4s", socket.inet_aton(MDNS_GROUP), socket.inet_aton(host))
    udp.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    listener = socket.create_server((host, port), backlog=128)
    selector = selectors.DefaultSelector()
    selector.register(udp, selectors.EVENT_READ, "udp")
    selector.register(listener, selectors.EVENT_READ, "listener")
    pending: dict[socket.socket, bytes] = {}
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data == "udp":
                seq, kind = sock.recv(2048).split(b" ", 2)[:2]
                tally.add(kind.decode(), int(seq))
            elif key.data == "listener":
                conn, _ = sock.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                selector.register(conn, selectors.EVENT_READ, "conn")
                pending[conn] = b""
            else:
                data = sock.recv(65536)
                if not data:
                    selector.unregister(sock)
                    del pending[sock]
                    sock.close()
                    continue
                pending[sock] += data
                while b"\n" in pending[sock]:
                    line, pending[sock] = pending[sock].split(b"\n", 1)
                    if line.startswith(b"bulk "):  # n bytes, then a newline; blocking is fine here
                        sock.setblocking(True)
                        sock.sendall(b"x" * int(line.split()[1]) + b"\n")
                    else:
                        sock.sendall(b"pong\n" if line == b"ping" else json.dumps(tally.kinds).encode() + b"\n")


def _ask(host: str, port: int, line: bytes) -> tuple[float, float, bytes, float | None]:
    """Connect, send `line`, read the answer: the connect and answer times, the answer, and
    the least round trip the kernel measured on the connection (what --activation-dtype auto
    chooses by, mesh.transport.hidden_wire)."""
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=30) as conn:
        connected = time.perf_counter()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(line)
        reply = bytearray()
        while not reply.endswith(b"\n"):
            chunk = conn.recv(262144)
            if not chunk:
                break
            reply += chunk
        answered = time.perf_counter()
        rtt = hidden_wire.tcp_rtt_s(conn)
    return connected - started, answered - connected, bytes(reply), rtt


def measure(host: str, port: int, samples: int, udp: int, udp_rate: float, bulk: int) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:  # the server may still be starting: the first answer is not a sample
        try:
            _ask(host, port, b"ping\n")
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    connect_ms, request_ms, kernel_rtt_ms = [], [], []
    for _ in range(samples):
        c, r, reply, rtt = _ask(host, port, b"ping\n")
        assert reply == b"pong\n", reply
        connect_ms.append(c * 1e3)
        request_ms.append(r * 1e3)
        if rtt is not None:
            kernel_rtt_ms.append(rtt * 1e3)
    send_errors = 0
    if udp:
        out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        out.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        pad = b"x" * UDP_SIZE
        run = secrets.token_hex(4).encode()  # the server's tally outlives a run: count this one's
        started = time.perf_counter()
        for seq in range(udp):
            for kind, to in ((b"unicast-" + run, host), (b"multicast-" + run, MDNS_GROUP)):
                try:
                    out.sendto(b"%d %s " % (seq, kind) + pad, (to, port))
                except OSError:
                    send_errors += 1  # a loss that the sender sees is not a link's loss
            wait = started + (seq + 1) / udp_rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        out.close()
        time.sleep(0.5)  # the last datagrams are still on the (delayed) link
    tally = {}
    if udp:
        kinds = json.loads(_ask(host, port, b"stats\n")[2])
        empty = {"received": 0, "reordered": 0, "highest": -1}
        tally = {kind: kinds.get(f"{kind}-{run.decode()}", empty) for kind in ("unicast", "multicast")}
    bulk_s = _ask(host, port, b"bulk %d\n" % bulk)[1] if bulk else 0.0
    return {"connect_ms": connect_ms, "request_ms": request_ms, "kernel_rtt_ms": kernel_rtt_ms,
            "udp_sent": udp, "udp_send_errors": send_errors,
            "udp": tally, "bulk_bytes": bulk, "bulk_s": bulk_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("host")
    s.add_argument("port", type=int)
    m = sub.add_parser("measure")
    m.add_argument("host")
    m.add_argument("port", type=int)
    m.add_argument("--samples", type=int, default=100)
    m.add_argument("--udp", type=int, default=0)
    m.add_argument("--udp-rate", type=float, default=2000.0)
    m.add_argument("--bulk", type=int, default=0, help="then download this many bytes over TCP, timed")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.host, args.port)
    else:
        json.dump(measure(args.host, args.port, args.samples, args.udp, args.udp_rate, args.bulk), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
