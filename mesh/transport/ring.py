"""The ring: one pipeline step goes head -> stage 1 -> ... -> last stage -> head.

Why: with the head as a hub, every later stage was a round trip from the head, so a token
of an N-stage pipeline paid 2(N-1) one-way hops. On Wi-Fi a hop costs 1-5 ms, which for a
3-stage token was more than its compute. In the ring each stage hands its hidden states
straight to the next stage over a step-socket connection of its own, and the last stage's
token goes to the head on a connection the head opened to it for the run: N hops a token.

On the wire (the step socket, mesh.transport.step_socket):
- the head sends stage 1 a step whose `onward` holds the next stages' steps without their
  input and whose `route` says where each of those stages listens; a stage that gets such a
  step runs it, fills its hidden states in as onward[0]'s input and sends that, with the rest
  of onward and route, to route[0], instead of replying;
- before its first step the head opens a connection to the last stage and sends RETURN with
  the session id; the last stage's step carries `reply_on_return`, and its reply goes there;
- a stage that cannot reach the next one, or whose connection to it fails, sends FAILED to the
  stage before it, naming that node; a stage passes a FAILED it gets on toward the head. So a
  failure anywhere names the node to replace, as the hub did, and closing the head's
  connections ends the run on every stage (each stage closes its own onward connection when
  the connection its steps came on ends, which frees the session there).

Every stage checks the node it hands steps to exactly as a head does: the node must prove
the cluster key and be the node the route names (the step socket's handshake, over TLS).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import selectors
import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from mesh.config import Timeouts
from mesh.errors import EdgeMeshError, InvalidInput, PeerError
from mesh.transport import convert
from mesh.transport import step_socket as wire
from mesh.transport.generated import edgemesh_pb2 as pb
from mesh.transport.hidden_wire import CountSent, send_dtype
from mesh.types import HiddenDType, NodeId, RingHop, StageOutput, StageStep

# How long the head waits, once the last stage's return connection ended, for the stages
# before it to say which of them failed (they learn it from a closed connection at once).
BLAME_GRACE_S = 2.0
PROBE_SLACK_S = 0.25  # past its own deadline, for the probe's answer to come back from the event loop


def ring_request(steps: Sequence[StageStep], route: Sequence[RingHop],
                 hidden_dtype: HiddenDType = "f32") -> pb.ForwardRequest:
    """Stage 1's step of a ring: `steps[0]` (with its input, in `hidden_dtype`) carries
    `steps[1:]` onward, to `route[i]` each; the last one replies on the head's return connection."""
    if len(route) != len(steps) - 1 or not route:
        raise ValueError("a ring request needs one hop for each step after the first")
    msg = convert.stage_step_to_pb(steps[0], hidden_dtype)
    last = len(steps) - 1
    for index, (step, hop) in enumerate(zip(steps[1:], route, strict=True), start=1):
        onward = convert.stage_step_to_pb(step)  # no input: the stage before fills it in
        onward.reply_on_return = index == last
        msg.onward.append(onward.SerializeToString())
        msg.route.append(pb.RingHop(node_id=hop.node_id, host=hop.host, step_port=hop.step_port))
    return msg


def onward_steps(msg: pb.ForwardRequest) -> list[pb.ForwardRequest]:
    """The onward steps of a ring step, parsed (InvalidInput when one is not a ForwardRequest)."""
    steps: list[pb.ForwardRequest] = []
    for index, raw in enumerate(msg.onward):
        try:
            steps.append(pb.ForwardRequest.FromString(raw))
        except DecodeError:
            raise InvalidInput(f"ring hop {index}: the onward step is not a ForwardRequest") from None
    return steps


def check_ring_fields(msg: pb.ForwardRequest) -> None:
    """Refuse (InvalidInput) ring fields no head builds: a stage must not be made to dial
    anything but one well-formed hop, nor to hold a step it cannot route."""
    if len(msg.onward) != len(msg.route):
        raise InvalidInput(f"a ring step has {len(msg.onward)} onward steps for {len(msg.route)} hops")
    if len(msg.route) >= convert.MAX_PIPELINE_STAGES:
        raise InvalidInput(f"a ring of more than {convert.MAX_PIPELINE_STAGES} stages")
    if msg.reply_on_return and msg.route:
        raise InvalidInput("a ring step either goes onward or replies on the return connection, not both")
    onward_all = onward_steps(msg)
    for index, (onward, hop) in enumerate(zip(onward_all, msg.route, strict=True)):
        if not 0 < len(hop.node_id.encode()) <= wire.MAX_NODE_ID_BYTES:
            raise InvalidInput(f"ring hop {index}: a node id of 1 to {wire.MAX_NODE_ID_BYTES} bytes")
        try:
            ipaddress.ip_address(hop.host)
        except ValueError:
            # An address, never a name: a step must not make a stage look names up (or reach
            # whatever a name resolves to); the head resolves its hops before it builds the ring.
            raise InvalidInput(f"ring hop {index}: {hop.host[:64]!r} is not an IP address") from None
        if not 0 < hop.step_port <= 65535:
            raise InvalidInput(f"ring hop {index}: step port {hop.step_port} is not a port")
        if onward.WhichOneof("input") is not None or onward.onward or onward.route:
            raise InvalidInput(f"ring hop {index}: an onward step carries no input and no ring of its own")
        if onward.session_id != msg.session_id or onward.step != msg.step:
            raise InvalidInput(f"ring hop {index}: an onward step of another session or step")
        if onward.reply_on_return != (index == len(onward_all) - 1):
            raise InvalidInput("the last onward step, and only it, replies on the return connection")


def next_hop(msg: pb.ForwardRequest) -> RingHop:
    """Where a ring stage sends its output: route[0] (checked by check_ring_fields on arrival)."""
    hop = msg.route[0]
    return RingHop(NodeId(hop.node_id), hop.host, hop.step_port)


def onward_request(msg: pb.ForwardRequest, hidden: npt.NDArray[np.float32], dtype: HiddenDType) -> pb.ForwardRequest:
    """The next stage's step: onward[0] with this stage's hidden states as its input, in `dtype`."""
    nxt = pb.ForwardRequest.FromString(msg.onward[0])  # checked by check_ring_fields on arrival
    nxt.hidden.CopyFrom(convert.tensor_to_pb(hidden, dtype))
    nxt.onward.extend(msg.onward[1:])
    nxt.route.extend(msg.route[1:])
    return nxt


def failed_payload(node_id: str, error: EdgeMeshError | bytes) -> bytes:
    """A FAILED frame's payload: the node that failed, then why (an ERROR frame's payload)."""
    why = error if isinstance(error, bytes) else wire.error_payload(error)
    return node_id.encode()[: wire.MAX_NODE_ID_BYTES] + b"\n" + why


def error_from_failed(payload: bytes, what: str) -> EdgeMeshError:
    """The error a FAILED frame reports, naming its node when it is a peer's failure."""
    node, _, why = payload.partition(b"\n")
    error = wire.error_from_frame(why, what)
    if isinstance(error, PeerError) and node:
        error.node_id = node.decode(errors="replace")
    return error


class RingLink:
    """The later stages of one run reached as a ring: `first` is the connection to stage 1,
    `back` the one to the last stage that its replies come on. Blocking, on the run's driver
    thread (mesh.pipeline); one selector waits on both, so a failure reported from inside the
    ring ends the step as soon as it arrives, not at the deadline.

    `probe()` starts a check that names the first later stage's node that does not answer
    within `probe_s` (None: all answered): when no reply comes in time, nothing on the wire
    says which stage is stuck."""

    def __init__(self, first: wire.StepConnection, back: wire.StepConnection, hops: Sequence[RingHop],
                 timeouts: Timeouts, step_timeout_s: float,
                 probe: Callable[[], concurrent.futures.Future[NodeId | None]], probe_s: float,
                 count_sent: CountSent) -> None:
        if len(hops) < 2:
            raise ValueError("a ring has at least two later stages")
        self.address = first.address
        self.rtt_s = first.rtt_s
        self._count_sent = count_sent
        self._first = first
        self._back = back
        self._hops = tuple(hops)
        self._timeouts = timeouts
        self._step_timeout_s = step_timeout_s
        self._probe = probe
        self._probe_s = probe_s
        self._session_id = ""
        self._ahead: list[int] = []  # steps sent ahead whose outputs are still to come, in order
        self._selector = selectors.DefaultSelector()
        self._selector.register(first.fileno(), selectors.EVENT_READ, first)
        self._selector.register(back.fileno(), selectors.EVENT_READ, back)

    def send_ahead(self, steps: Sequence[StageStep]) -> bool:
        """Hand stage 1 a step and return: the stages work on it while the head computes the
        next one (a prefill chunk, a replayed token). Each stage takes its steps in order on
        its connection, so the KV caches fill as if every step had been waited for."""
        if len(self._ahead) >= len(self._hops):
            # One step in flight per later stage keeps every stage busy beside the head's own
            # next step; more would only fill the socket buffers (a send into full ones blocks
            # until the stage reads).
            self._collect(self._ahead[0], self._timeouts.first_token_s)
        self._start(steps)
        self._ahead.append(steps[-1].step)
        return True

    def _start(self, steps: Sequence[StageStep]) -> None:
        session_id = steps[0].session_id
        if session_id != self._session_id:
            self._session_id = session_id
            self._send(self._back, wire.RETURN, session_id.encode(), self._hops[-1].node_id)
        request = ring_request(steps, self._hops[1:], send_dtype(steps[0], self.rtt_s, self._count_sent))
        self._send(self._first, wire.STEP, request.SerializeToString(), self._hops[0].node_id)

    def run(self, steps: Sequence[StageStep]) -> StageOutput:
        """One step through every later stage; the last stage's output, once the outputs of the
        steps sent ahead came first. A PeerError names the node that failed."""
        wait = self._timeouts.first_token_s if steps[0].n_tokens > 1 or self._ahead else self._step_timeout_s
        self._start(steps)
        self._ahead.append(steps[-1].step)
        return self._collect(steps[-1].step, wait)

    def _collect(self, step: int, wait: float) -> StageOutput:
        """Read until the output of `step` comes; the outputs of the steps sent before it come
        first, in order, and are checked and dropped. Each output that comes gives the next
        one `wait` more."""
        first_node, last_node = self._hops[0].node_id, self._hops[-1].node_id
        deadline = time.monotonic() + wait
        while True:
            for conn in self._ready(deadline, wait):
                node = last_node if conn is self._back else first_node
                try:
                    frame = self._read(conn, deadline, node)
                except PeerError:
                    if conn is self._back:
                        self._blame_from_first()
                    raise
                if conn is self._back and frame.kind == wire.OUTPUT and self._ahead:
                    expected = self._ahead.pop(0)
                    output = self._output(frame.payload, expected, node)
                    if expected == step:
                        return output
                    deadline = time.monotonic() + wait  # the output of a step sent before: not needed
                    continue
                if conn is self._first and frame.kind == wire.FAILED:
                    raise error_from_failed(frame.payload, f"ring step from {self.address}")
                if frame.kind == wire.ERROR:
                    error = wire.error_from_frame(frame.payload, f"ring step on {conn.address}")
                    if isinstance(error, PeerError):
                        error.node_id = node
                    raise error
                raise PeerError(f"ring step on {conn.address}: unexpected frame kind {frame.kind}",
                                retryable=False, node_id=node)

    def _blame_from_first(self) -> None:
        """The return connection ended. The last stage closes it also when the stage before it
        went away, so that alone does not say who failed: whoever it was, the stage before it
        saw its connection end and says so toward the head. Raise what the first connection
        says within a short grace; return when it says nothing (then the last stage failed)."""
        grace = time.monotonic() + min(self._timeouts.connect_s, BLAME_GRACE_S)
        first_node = self._hops[0].node_id
        self._selector.unregister(self._back.fileno())  # at its end: it would be readable all along
        while (left := grace - time.monotonic()) > 0:
            if not self._first.buffered() and not any(
                    key.data is self._first for key, _ in self._selector.select(left)):
                continue
            frame = self._read(self._first, grace, first_node)
            if frame.kind == wire.FAILED:
                raise error_from_failed(frame.payload, f"ring step from {self.address}")
            raise PeerError(f"ring step: {self.address} sent frame kind {frame.kind} when the ring broke",
                            node_id=first_node)

    def _ready(self, deadline: float, wait: float) -> list[wire.StepConnection]:
        buffered = [conn for conn in (self._back, self._first) if conn.buffered()]
        if buffered:
            return buffered
        probing: concurrent.futures.Future[NodeId | None] | None = None
        while (left := deadline - time.monotonic()) > 0:
            # The check of who is stuck starts before the deadline, so that its answer is there when
            # the deadline passes: the stage is named as soon as a hub would have named it.
            events = self._selector.select(left if probing is not None else max(0.0, left - self._probe_s))
            if events:
                if probing is not None:
                    probing.cancel()
                ready: list[wire.StepConnection] = [key.data for key, _ in events]
                ready.sort(key=lambda conn: conn is not self._back)  # an output that came wins over a failure
                return ready
            if probing is None:
                probing = self._probe()
        stuck: NodeId | None = None
        if probing is not None:
            try:
                stuck = probing.result(timeout=self._probe_s + PROBE_SLACK_S)
            except (TimeoutError, concurrent.futures.CancelledError):
                probing.cancel()  # no answer about the answers: the last stage is named
        stuck = stuck or self._hops[-1].node_id
        raise PeerError(f"ring step: no reply within {wait:.0f}s; {stuck} is the stage that did not answer",
                        node_id=stuck)

    def _send(self, conn: wire.StepConnection, kind: int, payload: bytes, node: str) -> None:
        try:
            conn.send(kind, payload)
        except OSError as exc:
            raise PeerError(f"ring step to {conn.address}: {exc}", node_id=node) from exc

    @staticmethod
    def _read(conn: wire.StepConnection, deadline: float, node: str) -> wire.Frame:
        try:
            return conn.read(deadline)
        except wire.ConnectionClosed:
            raise PeerError(f"ring step: {conn.address} closed the connection", node_id=node) from None
        except TimeoutError:
            raise PeerError(f"ring step: {conn.address} sent part of a frame and stopped", node_id=node) from None
        except OSError as exc:
            raise PeerError(f"ring step on {conn.address}: {exc}", node_id=node) from exc
        except InvalidInput as exc:  # a frame over the size limit
            raise PeerError(f"ring step on {conn.address}: {exc}", retryable=False, node_id=node) from exc

    @staticmethod
    def _output(payload: bytes, step: int, node: str) -> StageOutput:
        try:
            output = convert.stage_output_from_pb(pb.ForwardReply.FromString(payload))
        except (DecodeError, InvalidInput) as exc:
            raise PeerError(f"ring step: a malformed reply from {node}: {exc}", retryable=False,
                            node_id=node) from exc
        if output.step != step or output.token_id is None:
            raise PeerError(f"ring step: the last stage answered step {output.step} without a token, expected "
                            f"step {step}'s token", retryable=False, node_id=node)
        return output

    def interrupt(self) -> None:
        self._first.interrupt()
        self._back.interrupt()

    def close(self) -> None:
        self._selector.close()
        self._first.close()
        self._back.close()
