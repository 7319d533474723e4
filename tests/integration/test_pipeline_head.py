"""The head of a pipeline (the node of stage 0) runs a whole request over real node
processes: its output equals llama-cpp-python's, a request it cannot head is refused with a
clear status while it keeps serving, and when a later stage fails the error names that
stage's node (so the gateway replaces the stage, not the head)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh.config import Limits, Timeouts
from mesh.errors import EdgeMeshError, InvalidInput, NotFound, PeerError
from mesh.transport.channels import NodeClient
from mesh.types import (
    LayerRange,
    NodeId,
    PipelineHop,
    PipelineJob,
)
from tests.conftest import Launcher
from tests.fixtures.node_wire import node_channel
from tests.fixtures.pipeline_jobs import greedy_job, run_tokens

pytestmark = pytest.mark.slow

PROMPT = "The history of the printing press"
SPLIT = (LayerRange(0, 15), LayerRange(15, 30))


def _job(sha: str, hops: tuple[PipelineHop, ...], prompt: list[int], max_tokens: int, **fields: Any) -> PipelineJob:
    return greedy_job(sha, hops, prompt, max_tokens, request_id="head-test", **fields)


def test_the_head_runs_the_pipeline_refuses_what_it_cannot_head_and_names_a_failed_stage(
        launcher: Launcher, default_model: Path, reference_llm: Any) -> None:
    from node.gguf import file_sha256

    sha = file_sha256(default_model)
    head_proc = launcher.node("head", default_model, "--role", "stage")
    tail_proc = launcher.node("tail", default_model, "--role", "stage")
    # A node with its step socket turned off: the head reaches it over gRPC Forward instead.
    grpc_proc = launcher.node("grpc-tail", default_model, "--role", "stage", "--step-port", "-1")
    head = PipelineHop(NodeId(head_proc.ready[3]), f"127.0.0.1:{head_proc.ready[1]}", SPLIT[0])
    tail = PipelineHop(NodeId(tail_proc.ready[3]), f"127.0.0.1:{tail_proc.ready[1]}", SPLIT[1])
    grpc_tail = PipelineHop(NodeId(grpc_proc.ready[3]), f"127.0.0.1:{grpc_proc.ready[1]}", SPLIT[1])
    prompt = reference_llm.tokenize(PROMPT.encode())
    reference = reference_llm.create_completion(PROMPT, max_tokens=24, temperature=0.0)
    expected_text = reference["choices"][0]["text"]
    timeouts, limits = Timeouts(), Limits()

    async def scenario() -> None:
        head_client = NodeClient(head.address, launcher.cluster_key, timeouts, limits)
        tail_client = NodeClient(tail.address, launcher.cluster_key, timeouts, limits)
        grpc_client = NodeClient(grpc_tail.address, launcher.cluster_key, timeouts, limits)
        try:
            await head_client.load_stage(sha, head.layers, n_ctx=512, slots=2, timeout_s=120)
            await tail_client.load_stage(sha, tail.layers, n_ctx=512, slots=2, timeout_s=120)
            await grpc_client.load_stage(sha, grpc_tail.layers, n_ctx=512, slots=2, timeout_s=120)
            assert (await tail_client.info()).step_port > 0
            assert (await grpc_client.info()).step_port == 0

            # The stream through both stages is llama.cpp's own greedy output, over the step
            # socket and over Forward alike.
            for later in (tail, grpc_tail):
                tokens = await run_tokens(head_client, _job(sha, (head, later), prompt, 24))
                assert reference_llm.detokenize(tokens).decode(errors="replace") == expected_text

            # Requests this node cannot head: a clear status each, and it keeps serving.
            bad: list[tuple[PipelineJob, type[EdgeMeshError]]] = [
                (_job(sha, (tail, head), prompt, 4), InvalidInput),  # stage 0 does not start at layer 0
                (_job(sha, (PipelineHop(tail.node_id, head.address, head.layers), tail), prompt, 4),
                 InvalidInput),  # stage 0 names another node
                (_job(sha, (head, PipelineHop(tail.node_id, tail.address, LayerRange(16, 30))), prompt, 4),
                 InvalidInput),  # a gap between the stages
                (_job(sha, (head, PipelineHop(tail.node_id, tail.address, LayerRange(15, 20))), prompt, 4),
                 InvalidInput),  # the stages stop short of the model's last layer
                (_job(sha, (PipelineHop(head.node_id, head.address, LayerRange(0, 10)),
                            PipelineHop(tail.node_id, tail.address, LayerRange(10, 30))), prompt, 4),
                 NotFound),  # layers the head has not loaded
                (_job(sha, (head, PipelineHop(NodeId("nöde\n"), tail.address, tail.layers)), prompt, 4),
                 InvalidInput),  # a node id that cannot travel in status metadata
                (_job("", (head, tail), prompt, 4), InvalidInput),  # no model named
                (_job(sha, (head, tail), prompt, 4, step_timeout_s=0.0), InvalidInput),
                (_job(sha, (head, tail), [10**6], 4), InvalidInput),  # a token outside the vocabulary
            ]
            for job, error in bad:
                with pytest.raises(error):
                    await run_tokens(head_client, job)

            # A later stage that is not the node the gateway named is blamed, not the head.
            impostor = PipelineHop(NodeId("impostor"), tail.address, tail.layers)
            with pytest.raises(PeerError) as raised:
                await run_tokens(head_client, _job(sha, (head, impostor), prompt, 4))
            assert raised.value.node_id == "impostor", raised.value

            # The tail dies mid-stream: the error names the tail's node.
            def kill_at(count: int) -> None:
                if count == 5:
                    tail_proc.popen.send_signal(signal.SIGKILL)

            with pytest.raises(PeerError) as raised:
                await run_tokens(head_client, _job(sha, (head, tail), prompt, 200), on_token=kill_at)
            assert raised.value.node_id == tail.node_id, raised.value
            tail_proc.popen.wait(timeout=10)

            # The head itself is unharmed: it still answers, and its KV slots are free again.
            info = await head_client.info()
            assert info.in_flight == 0
            assert head_proc.popen.poll() is None
        finally:
            await head_client.close()
            await tail_client.close()
            await grpc_client.close()

    asyncio.run(scenario())
    assert "Traceback" not in head_proc.log()


def test_run_pipeline_without_the_cluster_key_is_refused(launcher: Launcher, default_model: Path) -> None:
    from mesh.transport.generated import edgemesh_pb2, edgemesh_pb2_grpc

    proc = launcher.node("head", default_model, "--role", "stage")

    async def call() -> grpc.StatusCode:
        async with node_channel(f"127.0.0.1:{proc.ready[1]}", launcher.cluster_key) as channel:
            stub = edgemesh_pb2_grpc.NodeStub(channel)
            try:
                async for _ in stub.RunPipeline(edgemesh_pb2.RunPipelineRequest(), timeout=10):
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    assert asyncio.run(call()) == grpc.StatusCode.UNAUTHENTICATED
    assert proc.popen.poll() is None
