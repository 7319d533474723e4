"""Hold every packet of one NFQUEUE for a delay, then let it go: a link's latency in user space.

    python -m tests.harness.link_delayer --queue N --delay-ms D --jitter-ms J --seed S [--ready-file F]

This kernel has no netem qdisc, so tests/system/netns.py sends the packets a host puts on its
link to this process (an iptables NFQUEUE rule in the host's namespace, with --queue-bypass so
that packets pass untouched whenever no delayer is bound). Each packet is due at its arrival
+ delay + a uniform sample in [-jitter, +jitter], but never before the packet ahead of it
(a link does not reorder), and never before it arrived; at its due time it is accepted.

Because due times never decrease, the packets waiting form a FIFO: a deque, and one timer
(the select() timeout until the head is due). One thread does everything. Threads are not
needed, and a second one would not be safe to rely on: NetfilterQueue's Packet.accept calls
nfq_set_verdict on the same netlink handle that nfq_handle_packet is parsing into, and
libnfnetlink keeps per-handle state (the sequence counter, the receive buffer) without a
lock. It is serialised today only because the Cython code holds the GIL around both calls
(NetfilterQueue.run drops it only around recv()), which is an implementation detail.

Cost, measured on the 2-core test box (a TCP download through one delayer): ~5 us of user
CPU per packet; its sys time is mostly the kernel sending the released packet on (veth,
bridge, the peer's receive), work the sender would otherwise do. At 0.2 ms it passed
~33k packets/s (380 Mbit/s) at under half a core.

COPY_META mode: the kernel sends only the packet's metadata (no payload copy), so a verdict
leaves the packet as it was and each message is ~100 bytes, whatever the packet's size.

SIGTERM (or SIGINT): every packet still held is accepted at once, the queue is unbound, a
summary is logged, and the process exits 0.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import select
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger("link_delayer")

# The kernel holds at most this many packets for us; beyond it a packet is dropped. 4096 is
# ~35 ms of a 1 Gbit/s link's full-size packets, above any delay the profiles hold.
MAX_QUEUED = 4096
IDLE_WAKE_S = 1.0  # with nothing held, wake this often anyway (cheap; keeps the loop honest)


@dataclass
class Held:
    due: float  # time.monotonic()
    packet: Any  # netfilterqueue.Packet


class Delayer:
    """The FIFO of held packets and the rule that gives each its due time."""

    def __init__(self, delay_s: float, jitter_s: float, rng: random.Random) -> None:
        self.delay_s, self.jitter_s, self.rng = delay_s, jitter_s, rng
        self.held: collections.deque[Held] = collections.deque()
        self.last_due = 0.0
        self.seen = 0
        self.max_held = 0

    def arrive(self, packet: Any) -> None:
        """The NetfilterQueue callback: note the packet's due time, give no verdict yet."""
        now = time.monotonic()
        sample = self.rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0
        due = max(now + self.delay_s + sample, self.last_due, now)
        self.last_due = due
        self.held.append(Held(due, packet))
        self.seen += 1
        if len(self.held) > self.max_held:
            self.max_held = len(self.held)

    def release_due(self, now: float) -> None:
        held = self.held
        while held and held[0].due <= now:
            held.popleft().packet.accept()

    def release_all(self) -> None:
        while self.held:
            self.held.popleft().packet.accept()

    def timeout(self, now: float) -> float:
        """How long the loop may sleep: until the head of the FIFO is due."""
        if not self.held:
            return IDLE_WAKE_S
        return max(0.0, self.held[0].due - now)


def run(queue_num: int, delayer: Delayer, ready_file: Path | None) -> None:
    from netfilterqueue import COPY_META, NetfilterQueue

    stop_r, stop_w = os.pipe()
    os.set_blocking(stop_w, False)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        os.write(stop_w, b"x")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    queue = NetfilterQueue()
    with warnings.catch_warnings():
        # "Socket rcvbuf limit is now N": metadata-only messages need far less than it asks for
        warnings.simplefilter("ignore", RuntimeWarning)
        queue.bind(queue_num, delayer.arrive, max_len=MAX_QUEUED, mode=COPY_META)
    fd = queue.get_fd()
    os.set_blocking(fd, False)
    log.info("bound to queue %d: delay %.3f ms, jitter +-%.3f ms", queue_num, delayer.delay_s * 1e3,
             delayer.jitter_s * 1e3)
    if ready_file is not None:
        ready_file.write_text(f"{os.getpid()}\n")
    try:
        while not stopping:
            readable, _, _ = select.select([fd, stop_r], [], [], delayer.timeout(time.monotonic()))
            if fd in readable:
                queue.run(block=False)  # every message waiting, until EAGAIN
            delayer.release_due(time.monotonic())
    finally:
        delayer.release_all()
        queue.unbind()
        os.close(stop_r)
        os.close(stop_w)
    log.info("stopped by signal %s: %d packets delayed, at most %d held at once", stopping[0] if stopping else "-",
             delayer.seen, delayer.max_held)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", type=int, required=True, help="the NFQUEUE number to bind")
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the jitter samples")
    parser.add_argument("--ready-file", type=Path, help="written with our pid once the queue is bound")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    delayer = Delayer(args.delay_ms / 1e3, args.jitter_ms / 1e3, random.Random(args.seed))
    run(args.queue, delayer, args.ready_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
