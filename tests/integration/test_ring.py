"""A 3-stage pipeline runs as a ring over real node processes (mesh.transport.ring): each stage
hands its hidden states to the next itself and the last stage's token comes back to the head.

- greedy output equals llama-cpp-python's, and the middle stage, not the head, sent the hidden
  states to the last stage;
- ring fields no head builds are refused with INVALID_ARGUMENT on the step socket, and the
  node keeps serving; a route to a node that is not there comes back
  as FAILED naming that node;
- a middle stage that freezes, or is SIGKILLed, mid-stream is the node the error names (so the
  gateway replaces it, not the head or the last stage), and every surviving stage frees the
  session.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from mesh.config import Limits, Timeouts
from mesh.errors import InvalidInput, PeerError
from mesh.transport import convert, ring
from mesh.transport import step_socket as wire
from mesh.transport.channels import NodeClient
from mesh.transport.generated import edgemesh_pb2
from mesh.types import (
    LayerRange,
    ModelSha,
    NodeId,
    PipelineHop,
    PipelineJob,
    SamplingParams,
    StageStep,
)
from tests.conftest import Launcher, Proc, metric_lines
from tests.fixtures.pipeline_jobs import greedy_job, run_tokens

pytestmark = pytest.mark.slow

PROMPT = "The history of the printing press"
SPLIT = (LayerRange(0, 10), LayerRange(10, 20), LayerRange(20, 30))
N_CTX = 2048
# Three prefill chunks (of 512): the head hands the ring the first two without waiting for them.
LONG_PROMPT = "The history of the printing press begins in the fifteenth century. " * 90


def _job(sha: str, hops: tuple[PipelineHop, ...], prompt: list[int], max_tokens: int, **fields: Any) -> PipelineJob:
    return greedy_job(sha, hops, prompt, max_tokens, request_id="ring-test", **fields)


def _hop(proc: Proc, layers: LayerRange) -> PipelineHop:
    return PipelineHop(NodeId(proc.ready[3]), f"127.0.0.1:{proc.ready[1]}", layers)


def _sent_onward(proc: Proc) -> float:
    text = httpx.get(f"http://127.0.0.1:{proc.ready[2]}/metrics", timeout=10).text
    return sum(metric_lines(text, "edgemesh_node_pipeline_bytes_total").values())


def _decode_bytes_per_send(proc: Proc) -> dict[str, tuple[float, float]]:
    """{dtype: (bytes, sends)} of the decode steps' hidden states a node sent on."""
    text = httpx.get(f"http://127.0.0.1:{proc.ready[2]}/metrics", timeout=10).text
    sent = metric_lines(text, "edgemesh_node_pipeline_bytes_total")
    sends = metric_lines(text, "edgemesh_node_pipeline_sends_total")
    out = {}
    for key, value in sent.items():
        if 'kind="decode"' in key:
            dtype = key.split('dtype="')[1].split('"')[0]
            out[dtype] = (value, sends[key.replace("pipeline_bytes_total", "pipeline_sends_total")])
    return out


def _step(sha: str, layers: LayerRange, **fields: Any) -> edgemesh_pb2.ForwardRequest:
    """A step for the middle stage (hidden states of one token) with ring fields on top."""
    import numpy as np

    step = StageStep(session_id="bad-ring", model_sha256=ModelSha(sha), layers=layers, start_position=0,
                     tokens=None, hidden=np.zeros((1, 576), dtype=np.float32), sampling=SamplingParams(), step=1)
    msg = convert.stage_step_to_pb(step)
    for name, value in fields.items():
        if name in ("onward", "route"):
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return msg


def test_a_three_stage_ring_matches_llama_cpp_refuses_bad_routes_and_names_a_failed_middle_stage(
        launcher: Launcher, default_model: Path, reference_llm: Any) -> None:
    from node.gguf import file_sha256

    sha = file_sha256(default_model)
    procs = [launcher.node(name, default_model, "--role", "stage") for name in ("head", "middle", "last")]
    head, middle, last = (_hop(proc, layers) for proc, layers in zip(procs, SPLIT, strict=True))
    prompt = reference_llm.tokenize(PROMPT.encode())
    expected = reference_llm.create_completion(PROMPT, max_tokens=24, temperature=0.0)["choices"][0]["text"]
    timeouts, limits = Timeouts(), Limits()
    key = launcher.cluster_key

    middle_step_port = asyncio.run(_info_step_port(middle.address, key))

    def middle_connection() -> wire.StepConnection:
        return wire.StepConnection.open("127.0.0.1", middle_step_port, key, middle.node_id, timeouts, limits, 30.0)

    async def scenario() -> None:
        clients = [NodeClient(hop.address, key, timeouts, limits) for hop in (head, middle, last)]
        try:
            for client, hop in zip(clients, (head, middle, last), strict=True):
                await client.load_stage(sha, hop.layers, n_ctx=N_CTX, slots=2, timeout_s=120)

            tokens = await run_tokens(clients[0], _job(sha, (head, middle, last), prompt, 24))
            assert reference_llm.detokenize(tokens).decode(errors="replace") == expected
            # In a ring the middle stage sends its hidden states on itself; through a hub it sends nothing.
            assert _sent_onward(procs[1]) > 0
            assert set(_decode_bytes_per_send(procs[1])) == {"f32"}

            # A long prompt's chunks overlap in the ring, and the output is still llama.cpp's.
            long_prompt = reference_llm.tokenize(LONG_PROMPT.encode())
            assert 1024 < len(long_prompt) < N_CTX - 16
            reference_llm.reset()
            want_long = reference_llm.create_completion(LONG_PROMPT, max_tokens=8, temperature=0.0)["choices"][0]
            got_long = await run_tokens(clients[0], _job(sha, (head, middle, last), long_prompt, 8, n_ctx=N_CTX))
            assert reference_llm.detokenize(got_long).decode(errors="replace") == want_long["text"]

            # --activation-dtype: every hop in f16, or q8_0; auto keeps f32 on loopback's fast links,
            # and so llama.cpp's output.
            for policy, dtype, per_token in (("f16", "f16", 576 * 2), ("q8_0", "q8_0", 576 // 32 * 34),
                                             ("auto", "f32", 576 * 4)):
                before = [_decode_bytes_per_send(procs[i]).get(dtype, (0.0, 0.0)) for i in (0, 1)]
                drifted = await run_tokens(clients[0], _job(sha, (head, middle, last), prompt, 24,
                                                            activation_dtype=policy))
                assert len(drifted) == 24, policy
                if policy == "auto":
                    assert drifted == tokens
                for i, (sent, sends) in zip((0, 1), before, strict=True):  # the head's hop and the middle's
                    now_sent, now_sends = _decode_bytes_per_send(procs[i])[dtype]
                    assert (now_sent - sent) / (now_sends - sends) == per_token, (policy, i)

            # A stage that freezes mid-stream: no reply comes, the head asks who is stuck.
            def freeze_at(count: int) -> None:
                if count == 3:
                    procs[1].popen.send_signal(signal.SIGSTOP)

            try:
                with pytest.raises(PeerError) as raised:
                    await run_tokens(clients[0], _job(sha, (head, middle, last), prompt, 200, step_timeout_s=2.0),
                                  on_token=freeze_at)
            finally:
                procs[1].popen.send_signal(signal.SIGCONT)
            assert raised.value.node_id == middle.node_id, raised.value

            # The middle stage dies mid-stream: the error names it, not the head or the last stage.
            def kill_at(count: int) -> None:
                if count == 5:
                    procs[1].popen.send_signal(signal.SIGKILL)

            with pytest.raises(PeerError) as raised:
                await run_tokens(clients[0], _job(sha, (head, middle, last), prompt, 200), on_token=kill_at)
            assert raised.value.node_id == middle.node_id, raised.value
            procs[1].popen.wait(timeout=10)

            # The head and the last stage are unharmed and have freed the session.
            deadline = time.monotonic() + 10
            while True:
                loads = [(await clients[i].info()).in_flight for i in (0, 2)]
                if loads == [0, 0] or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert loads == [0, 0]
        finally:
            for client in clients:
                await client.close()

    async def bad_rings() -> None:
        onward = convert.stage_step_to_pb(StageStep(session_id="bad-ring", model_sha256=ModelSha(sha),
                                                    layers=SPLIT[2], start_position=0, tokens=None, hidden=None,
                                                    sampling=SamplingParams(), step=1))
        onward.reply_on_return = True
        onward_bytes = onward.SerializeToString()
        good_hop = edgemesh_pb2.RingHop(node_id=last.node_id, host="127.0.0.1", step_port=1)
        cases = {
            "more hops than steps": _step(sha, SPLIT[1], route=[good_hop, good_hop], onward=[onward_bytes]),
            "a port that is not one": _step(sha, SPLIT[1], onward=[onward_bytes], route=[edgemesh_pb2.RingHop(
                node_id=last.node_id, host="127.0.0.1", step_port=70000)]),
            "no node id": _step(sha, SPLIT[1], onward=[onward_bytes], route=[edgemesh_pb2.RingHop(
                host="127.0.0.1", step_port=1)]),
            "onward and return at once": _step(sha, SPLIT[1], onward=[onward_bytes], route=[good_hop],
                                               reply_on_return=True),
        }
        for name, msg in cases.items():
            conn = middle_connection()
            try:
                conn.send(wire.STEP, msg.SerializeToString())
                frame = conn.read(time.monotonic() + 30)
                assert frame.kind == wire.ERROR, name
                assert isinstance(wire.error_from_frame(frame.payload, name), InvalidInput), (name, frame.payload)
            finally:
                conn.close()

        # A route to a node that is not there: FAILED, naming it.
        conn = middle_connection()
        try:
            conn.send(wire.STEP, _step(sha, SPLIT[1], onward=[onward_bytes], route=[good_hop]).SerializeToString())
            frame = conn.read(time.monotonic() + 30)
            assert frame.kind == wire.FAILED, frame
            error = ring.error_from_failed(frame.payload, "test")
            assert isinstance(error, PeerError) and error.node_id == last.node_id, error
        finally:
            conn.close()

    # Bad routes first, while the middle stage is alive; then the scenario that ends it.
    async def load_middle() -> None:
        client = NodeClient(middle.address, key, timeouts, limits)
        try:
            await client.load_stage(sha, middle.layers, n_ctx=N_CTX, slots=2, timeout_s=120)
        finally:
            await client.close()

    asyncio.run(load_middle())
    asyncio.run(bad_rings())
    asyncio.run(scenario())
    for proc in (procs[0], procs[2]):
        assert proc.popen.poll() is None
        assert "Traceback" not in proc.log()


async def _info_step_port(address: str, key: str) -> int:
    client = NodeClient(address, key, Timeouts(), Limits())
    try:
        return (await client.info()).step_port
    finally:
        await client.close()
