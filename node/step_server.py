"""The node's end of the step socket (see mesh.transport.step_socket).

Each connection that proved the cluster key gets a plain thread that reads a step, hands
it to the node's compute thread, waits for the result and writes the reply: no event loop
on the path, so an idle stage sleeps in recv and leaves the cores to the stage that is
computing. Connections still in the handshake share one selector thread instead: one that
never proves the key costs a socket, for a bounded time and among a bounded number, and
no thread. A step is checked, run and answered as a Forward step is (node.stage_steps),
and its errors counted the same way (node.answering): draining refuses new sessions, and
every session opened on a connection is released when the connection ends, however it ends.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from google.protobuf.message import DecodeError

from mesh.config import Limits, Timeouts
from mesh.errors import (
    CapacityExhausted,
    ConfigError,
    EdgeMeshError,
    InvalidInput,
    Unauthenticated,
    Unavailable,
)
from mesh.metrics import NodeMetrics
from mesh.transport import hidden_wire
from mesh.transport import step_socket as wire
from mesh.transport.generated import edgemesh_pb2 as pb
from mesh.transport.tls import ClusterCredentials
from mesh.types import StageOutput, StageStep
from node.answering import answering
from node.compute import ComputeThread
from node.ring_relay import NextStageFailed, Relay, ReturnChannels, RunEnded, Waited
from node.stage_host import StageHost
from node.stage_steps import StageSteps

log = logging.getLogger(__name__)

_ACCEPT_POLL_S = 0.5  # how soon the handshake loop notices close()
_REPORT_EVERY_S = 60.0  # dropped handshakes are logged as one line per interval, not one each
_BACKLOG = 128
# accept() errors that say the process or system is out of a resource, not that the
# listener broke: shed a pending handshake (its descriptor) and go on.
_SHORTAGE = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}


@dataclass
class _Pending:
    """A connection that has not yet proved the cluster key: first its TLS handshake (when the
    node speaks TLS), then the cluster-key handshake, which gathers the bytes. Mutable: the
    one thread that runs handshakes moves it from the first phase to the second."""

    sock: socket.socket
    peer: object
    handshake: wire.NodeHandshake
    deadline: float
    tls_done: bool


class StepServer:
    """`on_open`/`on_close` are called from connection threads as a connection starts and
    ends, so a draining node waits for open step connections as it does for streams.

    Two stages, so that connections which never prove the key (idle, slow, or without it)
    cannot take what a real head needs: one thread accepts and runs every handshake with a
    selector, giving each at most Timeouts.connect_s however slowly its bytes come, and
    holding at most Limits.max_step_handshakes of them, dropping the oldest for a newcomer
    (a real head answers within a round trip, so it is never the oldest for long). Only a
    connection that proved the key counts against Limits.max_step_connections and gets its
    own thread."""

    def __init__(self, node_id: str, cluster_key: str, credentials: ClusterCredentials | None,
                 stages: StageHost, compute: ComputeThread,
                 metrics: NodeMetrics, timeouts: Timeouts, limits: Limits, draining: Callable[[], bool],
                 on_open: Callable[[], object], on_close: Callable[[], object]) -> None:
        self._node_id = node_id
        self._key = cluster_key
        # None only under --insecure-plaintext; otherwise every connection is TLS 1.3 with a
        # client certificate of this cluster before a byte of the step protocol is read.
        self._tls = credentials.server_context if credentials is not None else None
        self._steps = StageSteps(stages, compute, metrics, draining)
        self._metrics = metrics
        self._timeouts = timeouts
        self._limits = limits
        self._on_open = on_open
        self._on_close = on_close
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        # Oldest first: handshakes all get the same time, so this is also deadline order.
        self._pending: OrderedDict[socket.socket, _Pending] = OrderedDict()
        self._connections: set[socket.socket] = set()
        self._returns = ReturnChannels(timeouts, limits)  # the ring's: see node.ring_relay
        self._lock = threading.Lock()
        self._closed = False
        self._accepting: threading.Thread | None = None
        self._dropped = 0
        self._next_report = 0.0

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
        listener.listen(_BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._accepting = threading.Thread(target=self._handshake_loop, name="step-accept", daemon=True)
        self._accepting.start()
        return int(listener.getsockname()[1])

    def close(self) -> None:
        """Stop accepting and cut the connections still open (after the node's drain)."""
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        for conn in connections:
            _shutdown(conn)  # wakes its thread, which releases the sessions and closes it
        self._returns.close()
        if self._accepting is not None:
            self._accepting.join()  # it closes the pending handshakes as it ends
        if self._selector is not None:
            self._selector.close()
        if self._listener is not None:
            self._listener.close()

    def _handshake_loop(self) -> None:
        assert self._selector is not None
        try:
            while not self._closed:
                wait = _ACCEPT_POLL_S
                if self._pending:
                    first = next(iter(self._pending.values()))
                    wait = max(0.0, min(wait, first.deadline - time.monotonic()))
                for key, _events in self._selector.select(wait):
                    if key.data is None:
                        if not self._accept_all():
                            return
                    else:
                        self._advance(key.data)
                self._expire(time.monotonic())
        except Exception:  # a bug here would silently end the step socket: say so
            log.exception("the step socket stopped accepting")
        finally:
            while self._pending:
                self._forget(next(iter(self._pending.values())))

    def _accept_all(self) -> bool:
        """Take the connections waiting in the backlog, a quarter of the handshake cap at a
        time; False once the listener broke. Between batches the selector reads the proofs
        that have arrived: a flood that filled the backlog must not push out, unread, a head
        whose proof is already waiting."""
        assert self._listener is not None
        batch = max(1, self._limits.max_step_handshakes // 4)
        while not self._closed and batch > 0:
            batch -= 1
            try:
                conn, peer = self._listener.accept()
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    continue
                if exc.errno in _SHORTAGE:
                    # Out of descriptors: make room by dropping the oldest handshake, or wait
                    # for connections to end (the listener stays readable meanwhile).
                    if self._pending:
                        self._shed(next(iter(self._pending.values())), "out of file descriptors")
                    else:
                        log.warning("the step socket cannot accept: %s", exc)
                        time.sleep(_ACCEPT_POLL_S)
                    return True
                if not self._closed:
                    log.exception("the step socket stopped accepting")
                return False
            try:
                self._begin(conn, peer)
            except Exception:  # one connection's trouble must not stop the node accepting
                log.exception("could not take a step connection from %s", peer)
                if conn in self._pending:
                    self._forget(self._pending[conn])
                else:
                    conn.close()
        return True

    def _begin(self, conn: socket.socket, peer: object) -> None:
        assert self._selector is not None
        if self._pending and len(self._pending) >= self._limits.max_step_handshakes:
            # The newcomer may be the head that has the key; the oldest has had longest to
            # prove it and has not.
            self._shed(next(iter(self._pending.values())),
                       f"{self._limits.max_step_handshakes} handshakes pending")
        conn.setblocking(False)
        wire.tune(conn, self._timeouts)
        if self._tls is not None:
            conn = self._tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        handshake = wire.NodeHandshake(self._key, self._node_id)
        pending = _Pending(conn, peer, handshake, time.monotonic() + self._timeouts.connect_s,
                           tls_done=self._tls is None)
        self._pending[conn] = pending
        self._selector.register(conn, selectors.EVENT_READ, pending)
        if pending.tls_done:
            self._greet(pending)

    def _greet(self, pending: _Pending) -> None:
        if not _send_all_now(pending.sock, pending.handshake.hello()):
            self._forget(pending)

    def _advance_tls(self, pending: _Pending) -> None:
        """One more round of the TLS handshake; the cluster-key handshake starts once it is done."""
        assert self._selector is not None and isinstance(pending.sock, ssl.SSLSocket)
        try:
            pending.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(pending.sock, selectors.EVENT_READ, pending)
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(pending.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, pending)
            return
        except (ssl.SSLError, OSError) as exc:
            # A certificate of another cluster, none at all, or plain text: the peer has not the key.
            if isinstance(exc, ssl.SSLError):
                self._metrics.auth_failures.inc()
                self._metrics.rpc_errors.labels("Step", "UNAUTHENTICATED").inc()
            log.info("step connection from %s refused in the TLS handshake: %s", pending.peer, exc)
            self._forget(pending)
            return
        pending.tls_done = True
        self._selector.modify(pending.sock, selectors.EVENT_READ, pending)
        self._greet(pending)

    def _advance(self, pending: _Pending) -> None:
        """Read what the peer sent; answer its proof once whole."""
        if not pending.tls_done:
            self._advance_tls(pending)
            return
        try:
            data = pending.sock.recv(512)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as exc:
            log.debug("step connection from %s broke in the handshake: %s", pending.peer, exc)
            self._forget(pending)
            return
        if not data:
            self._forget(pending)  # gone before proving anything
            return
        try:
            proof = pending.handshake.feed(data)
        except EdgeMeshError as exc:
            if isinstance(exc, Unauthenticated):
                self._metrics.auth_failures.inc()
            self._metrics.rpc_errors.labels("Step", exc.grpc_code).inc()
            log.info("step connection from %s refused: %s", pending.peer, exc)
            _send_all_now(pending.sock, wire.error_frame(exc))
            _discard_unread(pending.sock)
            self._forget(pending)
            return
        if proof is not None:
            self._admit(pending, proof)

    def _admit(self, pending: _Pending, proof: bytes) -> None:
        """The head proved the key: from now on this is one of the node's step connections."""
        assert self._selector is not None
        conn = pending.sock
        self._selector.unregister(conn)
        del self._pending[conn]
        with self._lock:
            full = len(self._connections) >= self._limits.max_step_connections
            if not full and not self._closed:
                self._connections.add(conn)
        if full or self._closed:
            # Said in place of the node's proof, so the head's open fails with it at once.
            refusal: EdgeMeshError = Unavailable("node is stopping") if self._closed else CapacityExhausted(
                f"node has {self._limits.max_step_connections} step connections open")
            self._metrics.rpc_errors.labels("Step", refusal.grpc_code).inc()
            _send_all_now(conn, wire.error_frame(refusal))
            conn.close()
            return
        if not _send_all_now(conn, proof):
            with self._lock:
                self._connections.discard(conn)
            conn.close()
            return
        conn.setblocking(True)
        try:
            threading.Thread(target=self._serve, args=(conn, pending.peer), name="step-conn", daemon=True).start()
        except RuntimeError:  # no thread to be had: this connection cannot be served
            log.exception("no thread for the step connection from %s", pending.peer)
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _expire(self, now: float) -> None:
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if oldest.deadline > now:
                return
            self._metrics.rpc_errors.labels("Step", "DEADLINE_EXCEEDED").inc()
            self._drop(oldest, f"no proof of the cluster key within {self._timeouts.connect_s:.0f}s")

    def _shed(self, pending: _Pending, why: str) -> None:
        """Make room for a newcomer."""
        self._metrics.rpc_errors.labels("Step", "RESOURCE_EXHAUSTED").inc()
        self._drop(pending, why)

    def _drop(self, pending: _Pending, why: str) -> None:
        """End a handshake that went nowhere. One log line per interval: a flood of idle
        connections must not become a flood of log lines."""
        log.debug("step connection from %s dropped: %s", pending.peer, why)
        self._forget(pending)
        self._dropped += 1
        now = time.monotonic()
        if now >= self._next_report:
            log.warning("step socket: dropped %d connection(s) that had not proved the cluster key (latest: %s)",
                        self._dropped, why)
            self._dropped = 0
            self._next_report = now + _REPORT_EVERY_S

    def _forget(self, pending: _Pending) -> None:
        assert self._selector is not None
        self._pending.pop(pending.sock, None)
        try:
            self._selector.unregister(pending.sock)
        except (KeyError, ValueError):
            pass  # never registered, or already closed
        pending.sock.close()

    def _serve(self, conn: socket.socket, peer: object) -> None:
        opened: set[str] = set()
        counted = False
        handed_over = False
        relay = Relay(conn, self._key, self._timeouts, self._limits, self._returns)
        rtt_s = hidden_wire.tcp_rtt_s(conn)  # the link back to the head, for a hub's replies
        try:
            # Counted as work in flight (a drain waits for it) only now that the head proved the key.
            self._on_open()
            counted = True
            # A connection lives as long as one request may; a head that vanished is noticed
            # sooner by TCP keepalive (wire.tune).
            deadline = time.monotonic() + self._timeouts.request_s
            while True:
                waited = relay.wait(deadline)
                if waited is Waited.RUN_ENDED:
                    return
                if waited is Waited.NEXT_FAILED:
                    # The next stage of a ring failed: tell the stage before (toward the head), whose
                    # run is over; it ends this connection, which ends the onward one.
                    failure = relay.next_failure()
                    log.info("step connection from %s: a later stage failed: %s", peer, failure[:200])
                    wire.send_frame(conn, wire.FAILED, failure)
                    return
                frame = relay.read_step(self._limits.max_message_bytes, deadline)
                if frame.kind == wire.RETURN:
                    handed_over = self._register_return(conn, frame.payload, peer)
                    return
                with answering(self._metrics, "Step", "the step") as answer:  # as Forward answers
                    self._metrics.bytes_in.inc(len(frame.payload))
                    msg, step, output = self._step(frame, opened)
                if answer.error is not None:
                    log.info("step connection from %s ended: %s", peer, answer.error)
                    _try_send_error(conn, answer.error)
                    return
                if msg.onward and output.hidden is not None:
                    sent = relay.send_onward(msg, replace(step, hidden=output.hidden), self._timeouts.first_token_s,
                                             self._metrics.count_hidden_sent)
                    self._metrics.bytes_out.inc(sent)
                    continue
                reply = bytes(self._steps.reply(step, output, rtt_s).SerializeToString())
                if msg.reply_on_return:
                    relay.send_return(step.session_id, reply)
                else:
                    wire.send_frame(conn, wire.OUTPUT, reply)
                self._metrics.bytes_out.inc(len(reply))
        except NextStageFailed as exc:
            log.info("step connection from %s: the next stage failed: %s", peer, exc)
            with contextlib.suppress(OSError):
                conn.settimeout(1.0)
                wire.send_frame(conn, wire.FAILED, exc.payload)
        except (wire.ConnectionClosed, RunEnded):
            pass  # the head ended the run
        except EdgeMeshError as exc:  # a frame too large, or none in time
            self._metrics.rpc_errors.labels("Step", exc.grpc_code).inc()
            log.info("step connection from %s ended: %s", peer, exc)
            _try_send_error(conn, exc)
        except OSError as exc:  # TimeoutError included
            log.info("step connection from %s broke: %s", peer, exc)
        except Exception:  # a bug in reading frames must not pass silently
            log.exception("step connection from %s failed", peer)
        finally:
            relay.close()
            self._steps.release(opened)
            with self._lock:
                self._connections.discard(conn)
            if not handed_over:
                conn.close()
            if counted:
                self._on_close()

    def _register_return(self, conn: socket.socket, payload: bytes, peer: object) -> bool:
        """A head's RETURN: this connection takes one session's replies from now on, written by
        the thread serving that session's steps; True once it is handed over to that thread
        (False: its head closed it first, or it could not be registered)."""
        held = False
        with answering(self._metrics, "Step", "the return connection") as answer:
            held = self._returns.hold(payload.decode(errors="replace"), conn)
        if answer.error is not None:
            log.info("return connection from %s refused: %s", peer, answer.error)
            _try_send_error(conn, answer.error)
        return held

    def _step(self, frame: wire.Frame, opened: set[str]) -> tuple[pb.ForwardRequest, StageStep, StageOutput]:
        if frame.kind != wire.STEP:
            raise InvalidInput(f"expected a step frame, got kind {frame.kind}")
        try:
            msg = pb.ForwardRequest.FromString(frame.payload)
        except DecodeError as exc:
            raise InvalidInput(f"the step is not a ForwardRequest: {exc}") from exc
        step, running = self._steps.start(msg, opened, ring=True)
        output = running.result()
        if msg.onward and output.hidden is None:
            raise InvalidInput("a ring step goes onward from the last stage of the model")
        return msg, step, output


def _shutdown(conn: socket.socket) -> None:
    try:
        # The socket's own shutdown: SSLSocket's would drop the TLS state its thread reads through.
        socket.socket.shutdown(conn, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by its thread


def _send_all_now(conn: socket.socket, data: bytes) -> bool:
    """Send a handshake-sized frame on a non-blocking socket. It fits an empty send buffer,
    so a short send means the peer is gone or is not reading: either way it is dropped."""
    try:
        return conn.send(data) == len(data)
    except OSError:
        return False


def _discard_unread(conn: socket.socket) -> None:
    """Read what the peer sent past the point of refusal (a bounded amount, without waiting):
    closing a socket with unread bytes resets the connection, and the reset can destroy the
    ERROR frame before the peer reads why it was refused."""
    for _ in range(16):
        try:
            if not conn.recv(4096):
                return
        except OSError:  # nothing more waiting (BlockingIOError), or already gone
            return


def _try_send_error(conn: socket.socket, error: EdgeMeshError) -> None:
    try:
        conn.settimeout(1.0)
        wire.send_error(conn, error)
    except OSError:
        pass  # the head is gone; nothing to tell
