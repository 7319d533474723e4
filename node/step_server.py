"""The node's end of the step socket (see mesh.transport.step_socket).

Each connection gets a plain thread that reads a step, hands it to the node's compute
thread, waits for the result and writes the reply: no event loop on the path, so an idle
stage sleeps in recv and leaves the cores to the stage that is computing. The checks are
Forward's: the same conversion and validation, draining refuses new sessions, and every
session opened on a connection is released when the connection ends, however it ends.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from functools import partial

from google.protobuf.message import DecodeError

from mesh.config import Limits, Timeouts
from mesh.errors import (
    CapacityExhausted,
    ConfigError,
    EdgeMeshError,
    InvalidInput,
    PeerError,
    Unauthenticated,
    Unavailable,
)
from mesh.metrics import NodeMetrics
from mesh.transport import convert
from mesh.transport import step_socket as wire
from mesh.transport.generated import edgemesh_pb2 as pb
from node.compute import ComputeThread
from node.stage_host import StageHost

log = logging.getLogger(__name__)

_ACCEPT_POLL_S = 0.5  # how soon the accept loop notices close()


class StepServer:
    """`on_open`/`on_close` are called from connection threads as a connection starts and
    ends, so a draining node waits for open step connections as it does for streams."""

    def __init__(self, node_id: str, cluster_key: str, stages: StageHost, compute: ComputeThread,
                 metrics: NodeMetrics, timeouts: Timeouts, limits: Limits, draining: Callable[[], bool],
                 on_open: Callable[[], object], on_close: Callable[[], object]) -> None:
        self._node_id = node_id
        self._key = cluster_key
        self._stages = stages
        self._compute = compute
        self._metrics = metrics
        self._timeouts = timeouts
        self._limits = limits
        self._draining = draining
        self._on_open = on_open
        self._on_close = on_close
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._accepting: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port) and return the port bound."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
        except OSError as exc:
            listener.close()
            raise ConfigError(f"cannot bind the step socket on {host}:{port} ({exc}); choose another "
                              "--step-port, or 0 for a free one") from exc
        listener.listen(64)
        listener.settimeout(_ACCEPT_POLL_S)
        self._listener = listener
        self._accepting = threading.Thread(target=self._accept_loop, name="step-accept", daemon=True)
        self._accepting.start()
        return int(listener.getsockname()[1])

    def close(self) -> None:
        """Stop accepting and cut the connections still open (after the node's drain)."""
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        for conn in connections:
            _shutdown(conn)  # wakes its thread, which releases the sessions and closes it
        if self._accepting is not None:
            self._accepting.join()
        if self._listener is not None:
            self._listener.close()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed:
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if not self._closed:
                    log.exception("the step socket stopped accepting")
                return
            try:
                self._admit(conn, peer)
            except Exception:  # one connection's trouble must not stop the node accepting
                log.exception("could not take a step connection from %s", peer)
                with self._lock:
                    self._connections.discard(conn)
                conn.close()

    def _admit(self, conn: socket.socket, peer: object) -> None:
        with self._lock:
            full = len(self._connections) >= self._limits.max_step_connections
            if not full and not self._closed:
                self._connections.add(conn)
        if full or self._closed:
            # A frame this small fits the new socket's send buffer: sending it cannot block.
            _try_send_error(conn, CapacityExhausted(
                f"node has {self._limits.max_step_connections} step connections open"))
            conn.close()
            return
        wire.tune(conn, self._timeouts)
        threading.Thread(target=self._serve, args=(conn, peer), name="step-conn", daemon=True).start()

    def _serve(self, conn: socket.socket, peer: object) -> None:
        opened: set[str] = set()
        counted = False
        try:
            conn.settimeout(self._timeouts.connect_s)
            wire.handshake_as_node(conn, self._key, self._node_id, time.monotonic() + self._timeouts.connect_s)
            # Counted as work in flight (a drain waits for it) only once the head proved the key.
            self._on_open()
            counted = True
            # A connection lives as long as one request may; a head that vanished is noticed
            # sooner by TCP keepalive (wire.tune).
            deadline = time.monotonic() + self._timeouts.request_s
            while True:
                frame = wire.read_frame(conn, self._limits.max_message_bytes, deadline)
                started = time.monotonic()
                self._metrics.bytes_in.inc(len(frame.payload))
                reply = self._step(frame, opened)
                wire.send_frame(conn, wire.OUTPUT, reply)
                self._metrics.bytes_out.inc(len(reply))
                self._metrics.rpc_duration.labels("Step").observe(time.monotonic() - started)
        except wire.ConnectionClosed:
            pass  # the head ended the run
        except EdgeMeshError as exc:
            if isinstance(exc, Unauthenticated):
                self._metrics.auth_failures.inc()
            self._metrics.rpc_errors.labels("Step", exc.grpc_code).inc()
            log.info("step connection from %s ended: %s", peer, exc)
            _try_send_error(conn, exc)
        except (TimeoutError, OSError) as exc:
            log.info("step connection from %s broke: %s", peer, exc)
        except Exception as exc:  # a bug or a compute failure must not pass silently
            log.exception("a step from %s failed", peer)
            self._metrics.rpc_errors.labels("Step", "INTERNAL").inc()
            _try_send_error(conn, PeerError(f"the step failed: {exc}", code="INTERNAL"))
        finally:
            for session_id in opened:
                self._stages.release(session_id)
            with self._lock:
                self._connections.discard(conn)
            conn.close()
            if counted:
                self._on_close()

    def _step(self, frame: wire.Frame, opened: set[str]) -> bytes:
        if frame.kind != wire.STEP:
            raise InvalidInput(f"expected a step frame, got kind {frame.kind}")
        try:
            msg = pb.ForwardRequest.FromString(frame.payload)
        except DecodeError as exc:
            raise InvalidInput(f"the step is not a ForwardRequest: {exc}") from exc
        step = convert.stage_step_from_pb(msg)
        if self._draining() and step.session_id not in opened:
            raise Unavailable("node is draining and takes no new sessions")
        opened.add(step.session_id)
        output = self._compute.call(partial(self._stages.step, step)).result()
        if output.token_id is not None:
            self._metrics.tokens.inc()
        return bytes(convert.stage_output_to_pb(step.session_id, output, step.reply_dtype).SerializeToString())


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by its thread


def _try_send_error(conn: socket.socket, error: EdgeMeshError) -> None:
    try:
        conn.settimeout(1.0)
        wire.send_error(conn, error)
    except OSError:
        pass  # the head is gone; nothing to tell
