"""One step message of a pipeline session, as the node answers it on either way in: a gRPC
Forward stream (node.service) and the step socket (node.step_server) check, run and reply
to it the same way.

Each connection or stream keeps the set of sessions it opened; they are released when it
ends, however it ends, and a draining node opens no new ones.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from functools import partial

from mesh.errors import InvalidInput, Unavailable
from mesh.metrics import NodeMetrics
from mesh.transport import convert, hidden_wire
from mesh.transport.generated import edgemesh_pb2 as pb
from mesh.transport.ring import check_ring_fields
from mesh.types import StageOutput, StageStep
from node.compute import ComputeThread
from node.stage_host import StageHost


class StageSteps:
    def __init__(self, stages: StageHost, compute: ComputeThread, metrics: NodeMetrics,
                 draining: Callable[[], bool]) -> None:
        self._stages = stages
        self._compute = compute
        self._metrics = metrics
        self._draining = draining

    def start(self, msg: pb.ForwardRequest, opened: set[str], *, ring: bool = False,
              ) -> tuple[StageStep, Future[StageOutput]]:
        """Check a ForwardRequest and queue its step on the compute thread (InvalidInput,
        Unavailable while draining for a session not yet open on this connection). `ring`: the
        step came on the step socket, where a step may go on round a ring (mesh.transport.ring)."""
        if ring:
            check_ring_fields(msg)
        elif msg.onward or msg.route or msg.reply_on_return:
            raise InvalidInput("ring steps go over the step socket, not a Forward stream")
        step = convert.stage_step_from_pb(msg)
        if self._draining() and step.session_id not in opened:
            raise Unavailable("node is draining and takes no new sessions")
        opened.add(step.session_id)
        return step, self._compute.call(partial(self._stages.step, step))

    def reply(self, step: StageStep, output: StageOutput, rtt_s: float | None = None) -> pb.ForwardReply:
        """The ForwardReply to a step that ran, its hidden states encoded for a link of round
        trip `rtt_s` (None: unknown, as a gRPC stream's) per the run's activation dtype."""
        if output.token_id is not None:
            self._metrics.tokens.inc()
        dtype = hidden_wire.dtype_for_link(step.reply_dtype, rtt_s)
        reply: pb.ForwardReply = convert.stage_output_to_pb(step.session_id, output, dtype)
        return reply

    def release(self, opened: set[str]) -> None:
        """The connection or stream ended: free the sessions it opened."""
        for session_id in opened:
            self._stages.release(session_id)
