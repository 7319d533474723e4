"""The ring's wire helpers (mesh.transport.ring): what the head builds is what each stage
checks and passes on."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.errors import InvalidInput, PeerError
from mesh.transport import ring
from mesh.types import LayerRange, ModelSha, NodeId, RingHop, SamplingParams, StageStep


def _steps(n: int) -> list[StageStep]:
    return [StageStep(session_id="s", model_sha256=ModelSha("a" * 64), layers=LayerRange(i * 10, i * 10 + 10),
                      start_position=3, tokens=None, hidden=np.ones((1, 4), np.float32) if i == 0 else None,
                      sampling=SamplingParams(), step=7) for i in range(n)]


def test_ring_request_and_onward_request_build_what_each_stage_expects() -> None:
    steps = _steps(3)
    hops = [RingHop(NodeId(f"n{i}"), "198.18.0.10", 4000 + i) for i in range(2)]
    msg = ring.ring_request(steps, hops)
    ring.check_ring_fields(msg)
    assert [o.reply_on_return for o in ring.onward_steps(msg)] == [False, True]
    assert ring.next_hop(msg) == hops[0]
    nxt = ring.onward_request(msg, np.full((1, 4), 2.0, np.float32), "f32")
    ring.check_ring_fields(nxt)
    assert list(nxt.hidden.shape) == [1, 4] and len(nxt.onward) == 1
    assert nxt.layers.first == 10 and nxt.route[0].node_id == "n1"
    with pytest.raises(ValueError):
        ring.ring_request(steps, hops[:1])


@pytest.mark.parametrize("spoil", ["reply_on_return_first", "other_session", "other_step", "input_onward", "nested",
                                   "host_name", "not_a_step"])
def test_ring_fields_no_head_builds_are_refused(spoil: str) -> None:
    hops = [RingHop(NodeId(f"n{i}"), "198.18.0.10", 4000 + i) for i in range(2)]
    msg = ring.ring_request(_steps(3), hops)
    onward = ring.onward_steps(msg)
    if spoil == "reply_on_return_first":
        onward[0].reply_on_return = True
    elif spoil == "other_session":
        onward[1].session_id = "t"
    elif spoil == "other_step":
        onward[0].step = 8
    elif spoil == "input_onward":
        onward[0].tokens.ids.append(1)
    elif spoil == "nested":
        onward[0].route.add(node_id="x", host="h", step_port=1)
    elif spoil == "not_a_step":
        onward[0] = None  # type: ignore[call-overload]
    else:  # a stage must never be made to look a name up
        msg.route[0].host = "stage.example"
    del msg.onward[:]
    msg.onward.extend(b"\xff\xff" if step is None else step.SerializeToString() for step in onward)
    with pytest.raises(InvalidInput):
        ring.check_ring_fields(msg)


def test_a_failed_frame_names_its_node_and_keeps_the_code() -> None:
    payload = ring.failed_payload("n2", PeerError("it broke", code="UNAVAILABLE"))
    error = ring.error_from_failed(payload, "test")
    assert isinstance(error, PeerError) and error.node_id == "n2" and "it broke" in str(error)
    refused = ring.error_from_failed(ring.failed_payload("n2", InvalidInput("bad step")), "test")
    assert isinstance(refused, InvalidInput)


def test_ring_fields_on_a_forward_stream_are_refused_before_any_work() -> None:
    """The ring runs on the step socket only: a Forward stream's step with ring fields is
    INVALID_ARGUMENT, checked by the step handler both ways in share (node.stage_steps)."""
    from prometheus_client import CollectorRegistry

    from mesh.metrics import NodeMetrics
    from node.compute import ComputeThread
    from node.stage_host import StageHost
    from node.stage_steps import StageSteps

    metrics = NodeMetrics(CollectorRegistry())
    compute = ComputeThread()
    try:
        steps = StageSteps(StageHost([], 1, metrics), compute, metrics, lambda: False)
        msg = ring.ring_request(_steps(3), [RingHop(NodeId(f"n{i}"), "198.18.0.10", 4000 + i) for i in range(2)])
        opened: set[str] = set()
        with pytest.raises(InvalidInput, match="step socket"):
            steps.start(msg, opened)
        assert not opened
    finally:
        compute.close()
