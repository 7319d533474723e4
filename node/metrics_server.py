"""The node's Prometheus exposition server, bounded in connections and in time.

prometheus_client's own start_http_server is a thread per connection with no timeout: an
idle or slowly dripping connection holds its thread for as long as the peer likes, and a
few hundred of them hold a few hundred threads. This one is the same WSGI app on the same
kind of server, with two bounds: a connection has Timeouts.connect_s to send its request
and take the answer (a scrape takes milliseconds), and at most
Limits.max_metrics_connections are served at once, the oldest cut for a newcomer, so that
idle connections cannot lock a real scraper out.
"""

from __future__ import annotations

import io
import logging
import socket
import socketserver
import sys
import threading
import time
from collections import OrderedDict
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from mesh.config import Limits, Timeouts
from mesh.errors import ConfigError

log = logging.getLogger(__name__)

_POLL_S = 0.5  # how often overdue connections are cut (serve_forever's poll interval)
_REPORT_EVERY_S = 60.0  # connections cut are logged as one line per interval, not one each


class _DebugLog(io.TextIOBase):
    """Where wsgiref writes the traceback of a request that broke (a peer that went away
    mid-answer): the node's debug log, not its stderr."""

    def write(self, text: str) -> int:
        if text.strip():
            log.debug("metrics request: %s", text.rstrip())
        return len(text)


class _Handler(WSGIRequestHandler):
    server: MetricsServer

    def setup(self) -> None:
        # Each read and write waits at most this long; the server bounds the whole connection.
        super().setup()
        self.connection.settimeout(self.server.deadline_s)

    def get_stderr(self) -> Any:
        return _DebugLog()

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged: there is one every few seconds."""


class MetricsServer(ThreadingMixIn, WSGIServer):
    """The connections being served, oldest first, each with the time it must be done by."""

    daemon_threads = True  # a scrape in progress must not hold up the node's exit
    block_on_close = False  # nor its shutdown; the threads end by their deadline anyway
    request_queue_size = 128  # the listen backlog: a burst of connections is accepted, then judged

    def __init__(self, host: str, port: int, registry: CollectorRegistry, timeouts: Timeouts,
                 limits: Limits) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.deadline_s = timeouts.connect_s
        self._cap = max(1, limits.max_metrics_connections)
        self._open: OrderedDict[socket.socket, float] = OrderedDict()
        self._cut: set[socket.socket] = set()  # shut down, their threads not yet ended
        self._lock = threading.Lock()
        self._dropped = 0
        self._next_report = 0.0
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            raise ConfigError(f"cannot bind the metrics server on {host}:{port} ({exc}); choose another "
                              "--metrics-port, or 0 for a free one") from None
        self.set_app(make_wsgi_app(registry))

    def server_bind(self) -> None:
        """WSGIServer's bind without its socket.getfqdn(host): that is a reverse DNS query to the
        LAN's resolver at every start, the one packet a node sent off the LAN with no cloud
        configured (tests/system/test_no_egress.py). The name only fills SERVER_NAME."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if len(self._open) >= self._cap:
                oldest = next(iter(self._open))
                self._cut_locked(oldest, f"{self._cap} connections open")
            self._open[request] = time.monotonic() + self.deadline_s
        super().process_request(request, client_address)

    def service_actions(self) -> None:
        """Called by serve_forever between polls: cut the connections past their time."""
        now = time.monotonic()
        with self._lock:
            overdue = [conn for conn, deadline in self._open.items() if deadline <= now]
            for conn in overdue:
                self._cut_locked(conn, f"not done within {self.deadline_s:.0f}s")

    def shutdown_request(self, request: Any) -> None:
        # Under the lock, so that a cut never reaches a descriptor number reused after close.
        with self._lock:
            self._open.pop(request, None)
            self._cut.discard(request)
            super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A peer that timed out or went away: not worth a traceback on stderr."""
        log.debug("metrics connection from %s ended: %s", client_address, sys.exc_info()[1])

    def _cut_locked(self, conn: socket.socket, why: str) -> None:
        """Wake the connection's thread (its read or write fails at once); it then closes it."""
        del self._open[conn]
        self._cut.add(conn)
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer already went
        self._dropped += 1
        now = time.monotonic()
        if now >= self._next_report:
            log.warning("metrics server: cut %d connection(s) (latest: %s)", self._dropped, why)
            self._dropped = 0
            self._next_report = now + _REPORT_EVERY_S

    def shutdown(self) -> None:
        """Stop serving and close the listening socket."""
        super().shutdown()
        self.server_close()


def start_metrics_server(host: str, port: int, registry: CollectorRegistry, timeouts: Timeouts,
                         limits: Limits) -> MetricsServer:
    """Serve /metrics on host:port (0 picks a free port; see .server_port) from a daemon thread."""
    server = MetricsServer(host, port, registry, timeouts, limits)
    threading.Thread(target=server.serve_forever, args=(_POLL_S,), name="metrics-http", daemon=True).start()
    return server
