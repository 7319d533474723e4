"""A stage's part in a ring of stages (see mesh.transport.ring), on the node's step socket.

`ReturnChannels` holds the connections heads opened to this node to take the replies of the
sessions whose last stage it is (a RETURN frame names the session). The connection thread
that serves the session's steps claims its channel at the session's first step and from
then on is the only thread that touches it, so no socket is read and written by two threads
(an SSL connection must not be).

`Relay` is what one served connection (steps coming from a head or from the stage before)
holds of the ring: the connection to the next stage, opened at the first step that goes
onward and checked like any step connection, and the return channels it claimed. Both end
with the served connection, so a run that ends anywhere ends on every stage after it.
"""

from __future__ import annotations

import enum
import logging
import select
import selectors
import socket
import ssl
import threading
import time

from mesh.config import Limits, Timeouts
from mesh.errors import CapacityExhausted, EdgeMeshError, InvalidInput, PeerError, Unavailable
from mesh.transport import ring
from mesh.transport import step_socket as wire
from mesh.transport.generated import edgemesh_pb2 as pb
from mesh.transport.hidden_wire import CountSent, send_dtype
from mesh.types import RingHop, StageStep

log = logging.getLogger(__name__)

_CLAIM_POLL_S = 0.05
_HOLD_POLL_S = 0.2  # how often a held return connection checks whether it was claimed
# How long the last stage waits for the head's RETURN when a session's step overtook it: the
# head sends it before the step's first hop, so it trails by a thread's wake-up, not a hop; a
# step that claims a session nobody registered gets its error soon.
RETURN_WAIT_S = 1.0


_RETURN = "return"  # the selector's tag of a claimed return connection


class Waited(enum.Enum):
    """What Relay.wait saw first."""

    STEP = "the stage before sent a frame"
    NEXT_FAILED = "the next stage sent a frame or closed"
    RUN_ENDED = "a head closed the return connection of a session served here"


class RunEnded(Exception):
    """The head ended the run (it closed a return connection this stage claimed)."""


class NextStageFailed(Exception):
    """The next stage of the ring failed, or could not be reached: `payload` is the FAILED
    frame to send toward the head."""

    def __init__(self, payload: bytes) -> None:
        super().__init__(payload.decode(errors="replace"))
        self.payload = payload


class ReturnChannels:
    """Connections heads registered to take one session's replies, until a step of that
    session claims one. Until then the thread of the connection that registered it holds it
    (`hold`): it ends it when the head closes it first (a run that failed before its first
    step reached the last stage), when Timeouts.request_s passes, or when the node stops; so
    a registration never outlives its head. There are never more than the node's step
    connections of them."""

    def __init__(self, timeouts: Timeouts, limits: Limits) -> None:
        self._timeouts = timeouts
        self._limits = limits
        self._waiting: dict[str, socket.socket] = {}
        self._changed = threading.Condition()
        self._closed = False

    def hold(self, session_id: str, sock: socket.socket) -> bool:
        """Register `sock` for the session's replies and wait, on the thread that read its RETURN,
        until a step claims it (True: it is the claimant's now) or it is to be closed (False).
        InvalidInput, CapacityExhausted, Unavailable when it cannot be registered. The socket is
        only polled here, never read, so the claimant is its one reader and writer."""
        if not 0 < len(session_id) <= 128:
            raise InvalidInput("a return connection names a session id of 1 to 128 characters")
        with self._changed:
            if self._closed:
                raise Unavailable("node is stopping")
            if session_id in self._waiting:
                raise InvalidInput(f"session {session_id} already has a return connection")
            if len(self._waiting) >= self._limits.max_step_connections:
                raise CapacityExhausted(f"{len(self._waiting)} return connections wait for their sessions")
            self._waiting[session_id] = sock
            self._changed.notify_all()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        deadline = time.monotonic() + self._timeouts.request_s
        while time.monotonic() < deadline:
            with self._changed:
                if not self._is_waiting(session_id, sock):
                    return True  # claimed (or closed by close(), which closed it)
            # Readable: a head sends nothing after RETURN, so it closed the connection.
            if poller.poll(_HOLD_POLL_S * 1000):
                break
        with self._changed:
            if not self._is_waiting(session_id, sock):
                return True  # claimed just now
            del self._waiting[session_id]
        return False

    def _is_waiting(self, session_id: str, sock: socket.socket) -> bool:
        return self._waiting.get(session_id) is sock

    def claim(self, session_id: str, wait_s: float) -> socket.socket | None:
        """The session's return connection, now this caller's to write and close; waits for it up
        to `wait_s` (the step can overtake the head's RETURN: they come on two connections)."""
        deadline = time.monotonic() + wait_s
        with self._changed:
            while session_id not in self._waiting and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(min(left, _CLAIM_POLL_S * 20))
            registered = self._waiting.pop(session_id, None)
        return registered

    def close(self) -> None:
        with self._changed:
            self._closed = True
            waiting = list(self._waiting.values())
            self._waiting.clear()
            self._changed.notify_all()
        for sock in waiting:
            sock.close()


class Relay:
    """One served connection's ring state; used only by that connection's thread."""

    def __init__(self, upstream: socket.socket, cluster_key: str, timeouts: Timeouts, limits: Limits,
                 returns: ReturnChannels) -> None:
        self._upstream = upstream
        self._key = cluster_key
        self._timeouts = timeouts
        self._limits = limits
        self._returns = returns
        self._next: wire.StepConnection | None = None
        self._next_hop: RingHop | None = None
        self._claimed: dict[str, socket.socket] = {}
        self._selector = selectors.DefaultSelector()
        self._selector.register(upstream, selectors.EVENT_READ, None)

    def wait(self, deadline: float) -> Waited:
        """Block until the stage before sends a frame, the next stage does (a failure to pass
        on), or a head closes a return connection claimed here (its run is over); TimeoutError
        at the deadline."""
        if isinstance(self._upstream, ssl.SSLSocket) and self._upstream.pending():
            return Waited.STEP
        if self._next is not None and self._next.buffered():
            return Waited.NEXT_FAILED
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed")
            events = self._selector.select(left)
            kinds = {key.data for key, _ in events}
            # A head sends nothing on a return connection after RETURN: readable means it closed.
            # The session ends here then, even when the stage before is cut off and never closes
            # its connection; ending this one ends the sessions on the stages between, backwards.
            if _RETURN in kinds:
                return Waited.RUN_ENDED
            if None in kinds:
                return Waited.STEP
            if events:
                return Waited.NEXT_FAILED

    def read_step(self, max_payload: int, deadline: float) -> wire.Frame:
        """The frame the stage before sent. RunEnded, even in the middle of the frame, when a
        head closes a return connection claimed here: a stage before that was cut off may have
        sent half a frame and never send the rest, nor close."""
        return wire.read_frame(self._upstream, max_payload, deadline, self._watch_returns)

    def _watch_returns(self, left: float) -> None:
        if not self._claimed:
            return
        events = self._selector.select(min(left, 0.25))
        if any(key.data is _RETURN for key, _ in events):
            raise RunEnded("a head closed the return connection of a session served here")

    def next_failure(self) -> bytes:
        """The FAILED payload for what the next stage sent or did (wait() returned False)."""
        assert self._next is not None and self._next_hop is not None
        node = self._next_hop.node_id
        try:
            frame = self._next.read(time.monotonic() + self._timeouts.connect_s)
        except (EdgeMeshError, OSError) as exc:  # closed, broken, or half a frame
            error = exc if isinstance(exc, EdgeMeshError) else PeerError(str(exc))
            return ring.failed_payload(node, PeerError(f"the connection to stage node {node} ended: {error}"))
        if frame.kind == wire.FAILED:
            return frame.payload  # already names the stage that failed, further on
        if frame.kind == wire.ERROR:
            return ring.failed_payload(node, frame.payload)
        return ring.failed_payload(node, PeerError(f"stage node {node} sent frame kind {frame.kind} back",
                                                   retryable=False))

    def send_onward(self, msg: pb.ForwardRequest, ran: StageStep, step_timeout_s: float,
                    count_sent: CountSent) -> int:
        """Hand the next stage its step (`msg`'s onward[0], with the hidden states of `ran`, the
        step this stage ran, encoded for the link to it), dialling it first if this is the
        first step for it; the bytes sent. NextStageFailed when it cannot be reached."""
        hop = ring.next_hop(msg)
        if self._next is None or self._next_hop != hop:
            self._close_next()
            try:
                self._next = wire.StepConnection.open(hop.host, hop.step_port, self._key, hop.node_id,
                                                      self._timeouts, self._limits, step_timeout_s)
            except EdgeMeshError as exc:
                raise NextStageFailed(ring.failed_payload(hop.node_id, exc)) from exc
            self._next_hop = hop
            self._selector.register(self._next.fileno(), selectors.EVENT_READ, self._next)
        assert ran.hidden is not None
        dtype = send_dtype(ran, self._next.rtt_s, count_sent)  # the link is known only once dialled
        payload = ring.onward_request(msg, ran.hidden, dtype).SerializeToString()
        try:
            self._next.send(wire.STEP, payload)
        except OSError as exc:
            raise NextStageFailed(ring.failed_payload(
                hop.node_id, PeerError(f"sending to stage node {hop.node_id}: {exc}"))) from exc
        return len(payload)

    def send_return(self, session_id: str, reply: bytes) -> None:
        """The last stage's reply, on the connection the head registered for the session."""
        sock = self._claimed.get(session_id)
        if sock is None:
            wait_s = min(self._timeouts.connect_s, RETURN_WAIT_S)
            sock = self._returns.claim(session_id, wait_s)
            if sock is None:
                raise PeerError(f"no return connection for session {session_id} within {wait_s:.1f}s",
                                retryable=True)
            self._claimed[session_id] = sock
            self._selector.register(sock, selectors.EVENT_READ, _RETURN)
        sock.settimeout(self._timeouts.connect_s)
        try:
            wire.send_frame(sock, wire.OUTPUT, reply)
        except OSError as exc:  # the head is gone: the run is over on every stage
            raise wire.ConnectionClosed(f"the head's return connection broke: {exc}") from exc

    def _close_next(self) -> None:
        if self._next is not None:
            self._selector.unregister(self._next.fileno())
            self._next.close()
            self._next = None
            self._next_hop = None

    def close(self) -> None:
        """The served connection ended: end the onward connection (the next stage frees the
        session) and the return connections this one claimed (the head sees the run end)."""
        self._close_next()
        for sock in self._claimed.values():
            self._selector.unregister(sock)
            sock.close()
        self._claimed.clear()
        self._selector.close()
