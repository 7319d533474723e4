"""What a placement controller asks of a real node process over gRPC: a node started with
role auto holds nothing until asked; LoadModel serves the whole model within the node's
memory budget (refused past it, the node serving on); --role stage refuses it; a release
of what has streams or sessions in flight is pending until they end; a claim keeps other
controllers (and calls without a controller id) from loading or releasing; bad input gets
INVALID_ARGUMENT and the node goes on serving."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh.config import Limits, Timeouts
from mesh.errors import CapacityExhausted, InvalidInput, NotClaimHolder, NotFound
from mesh.placement.planner import AUTO_SLOTS_MAX, Policy, replica_bytes
from mesh.transport import auth, convert
from mesh.transport.channels import SERVICE, NodeClient
from mesh.transport.generated import edgemesh_pb2 as pb
from mesh.transport.generated import edgemesh_pb2_grpc as pb_grpc
from mesh.types import GenerationRequest, LayerRange, ModelSha, RequestId, SamplingParams, TokenEvent
from tests.conftest import Launcher, Proc
from tests.fixtures.node_wire import node_channel

pytestmark = pytest.mark.slow

PROMPT = (1, 504, 2783, 282, 260, 5355, 1326, 30)  # a few ids of the default model's vocabulary
STAGE = LayerRange(10, 15)  # a middle stage: ~11 MB of weights, fits a 60 MB budget


@pytest.fixture(scope="module")
def sha(default_model: Path) -> str:
    from node.gguf import file_sha256

    return file_sha256(default_model)


@pytest.fixture(scope="module")
def auto_node(module_launcher: Launcher, default_model: Path) -> Proc:
    return module_launcher.node("auto", default_model)


@pytest.fixture(scope="module")
def small_node(module_launcher: Launcher, default_model: Path) -> Proc:
    return module_launcher.node("small", default_model, "--memory-limit", "60MB")


@pytest.fixture(scope="module")
def stage_node(module_launcher: Launcher, default_model: Path) -> Proc:
    return module_launcher.node("stage", default_model, "--role", "stage")


def address(proc: Proc) -> str:
    return f"127.0.0.1:{proc.ready[1]}"


@asynccontextmanager
async def client_of(proc: Proc, key: str) -> AsyncIterator[NodeClient]:
    client = NodeClient(address(proc), key, Timeouts(), Limits())
    try:
        yield client
    finally:
        await client.close()


async def raw(proc: Proc, key: str, method: str, request: Any) -> Any:
    """A signed call with a hand-made request (what NodeClient would never send)."""
    async with node_channel(address(proc), key) as channel:
        stub = pb_grpc.NodeStub(channel)
        return await getattr(stub, method)(request, timeout=30,
                                           metadata=auth.sign(key, SERVICE + method, request))


async def raw_code(proc: Proc, key: str, method: str, request: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await raw(proc, key, method, request)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def release(proc: Proc, key: str, sha: str, layers: LayerRange | None,
                  controller: str = "") -> tuple[bool, bool]:
    """(released, pending) of a ReleaseHolding, as the node answers it."""
    reply = await raw(proc, key, "ReleaseHolding", convert.release_holding_request_to_pb(sha, layers, controller))
    return bool(reply.released), bool(reply.pending)


def metric(proc: Proc, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{proc.ready[2]}/metrics", timeout=10).read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(name + (labels and "{")) and labels in line]
    assert values, f"{name}{labels} not exported"
    return sum(values)


def request(sha: str, max_tokens: int, request_id: str = "placement-test") -> GenerationRequest:
    return GenerationRequest(request_id=RequestId(request_id), prompt_tokens=PROMPT,
                             sampling=SamplingParams(temperature=0.0), max_tokens=max_tokens,
                             stop_token_ids=frozenset(), model_sha256=ModelSha(sha))


async def tokens(client: NodeClient, req: GenerationRequest) -> list[TokenEvent]:
    return [event async for event in client.generate(req)]


# ---------------------------------------------------------------------------- replicas


def test_a_node_with_role_auto_starts_holding_nothing(auto_node: Proc, sha: str, module_launcher: Launcher) -> None:
    async def scenario() -> None:
        async with client_of(auto_node, module_launcher.cluster_key) as client:
            info = await client.info()
            assert info.models == () and info.stages == () and info.claims == ()
            assert [f.sha256 for f in info.files] == [sha]  # it has the file to load from
            assert not info.stage_only and info.memory_budget > 0
            assert info.decode_tokens_per_second > 0 and info.speed_source == "start-up probe"
            # Started without --slots on a box with memory to spare: the most streams, stages one.
            assert (info.slots, info.stage_sessions) == (AUTO_SLOTS_MAX, 1)
            with pytest.raises(NotFound, match="no whole-model replica"):
                await tokens(client, request(sha, 4))

    asyncio.run(scenario())
    assert metric(auto_node, "edgemesh_node_layers_held") == 0


def test_load_model_serves_the_replica_and_a_release_waits_for_the_stream_in_flight(
        auto_node: Proc, sha: str, module_launcher: Launcher) -> None:
    key = module_launcher.cluster_key
    max_tokens = 256

    async def scenario() -> None:
        async with client_of(auto_node, key) as client:
            loaded = await client.load_model(sha, 0, 120, "")
            assert loaded.sha256 == sha and loaded.n_layers == 30 and loaded.n_ctx == 2048
            assert await client.load_model(sha, 0, 120, "") == loaded  # idempotent
            info = await client.info()
            assert [m.sha256 for m in info.models] == [sha]
            assert metric(auto_node, "edgemesh_node_layers_held") == 30
            short = await tokens(client, request(sha, 5))
            assert len(short) == 5 and short[-1].finish_reason == "length"

            stream = client.generate(request(sha, max_tokens, "long"))
            first = await stream.__anext__()
            assert await release(auto_node, key, sha, None) == (False, True)  # pending: a stream runs
            # It takes no new stream and is no longer offered, yet still holds its memory.
            assert (await client.info()).models == ()
            with pytest.raises(NotFound):
                await tokens(client, request(sha, 4, "refused"))
            assert metric(auto_node, "edgemesh_node_layers_held") == 30
            rest = [event async for event in stream]
            assert len(rest) + 1 == max_tokens and rest[-1].finish_reason == "length"
            assert [e.token_id for e in [first, *rest]][:5] == [e.token_id for e in short]  # greedy, undisturbed

            deadline = asyncio.get_running_loop().time() + 10
            while metric(auto_node, "edgemesh_node_layers_held") != 0:
                assert asyncio.get_running_loop().time() < deadline, "the replica was not freed after its stream"
                await asyncio.sleep(0.1)
            assert (await client.info()).models == ()
            assert await release(auto_node, key, sha, None) == (False, False)  # absent now
            # And it can be asked for again.
            await client.load_model(sha, 0, 120, "")
            assert len(await tokens(client, request(sha, 3))) == 3
            assert await release(auto_node, key, sha, None) == (True, False)  # no stream: freed at once
            assert (await client.info()).models == ()

    asyncio.run(scenario())
    assert metric(auto_node, "edgemesh_node_layers_held") == 0


def test_a_node_without_slots_serves_as_many_streams_at_once_as_its_budget_holds(
        module_launcher: Launcher, default_model: Path, sha: str) -> None:
    from node.profile import model_profile

    limit = replica_bytes(model_profile(default_model, sha), Policy(n_ctx=2048, sessions_per_stage=3))
    node = module_launcher.node("three-slots", default_model, "--memory-limit", str(limit))
    prompts = [PROMPT, PROMPT[:5], (1, 504, 2783, 282, 30)]

    async def scenario() -> None:
        async with client_of(node, module_launcher.cluster_key) as client:
            info = await client.info()
            assert (info.slots, info.stage_sessions, info.memory_limit) == (3, 1, limit)
            await client.load_model(sha, 0, 120, "")  # the three slots fit the limit they were sized by

            def one(i: int, prompt: tuple[int, ...]) -> GenerationRequest:
                return replace(request(sha, 24, f"slot-{i}"), prompt_tokens=prompt)

            alone = [[e.token_id for e in await tokens(client, one(i, p))] for i, p in enumerate(prompts)]
            steps_before = metric(node, "edgemesh_node_decode_batch_rows_count")
            at_most_two = metric(node, "edgemesh_node_decode_batch_rows_bucket", 'le="2.0"')
            together = await asyncio.gather(*(tokens(client, one(i, p)) for i, p in enumerate(prompts)))
            assert [[e.token_id for e in t] for t in together] == alone
            # Some step decoded all three: its row count is past the le=2 bucket.
            assert metric(node, "edgemesh_node_decode_batch_rows_count") - steps_before > \
                metric(node, "edgemesh_node_decode_batch_rows_bucket", 'le="2.0"') - at_most_two

    asyncio.run(scenario())


def test_load_model_past_the_memory_limit_is_refused_and_the_node_serves_on(
        small_node: Proc, sha: str, module_launcher: Launcher) -> None:
    async def scenario() -> None:
        async with client_of(small_node, module_launcher.cluster_key) as client:
            info = await client.info()
            assert info.memory_budget <= 60_000_000 and info.memory_limit == 60_000_000
            assert info.slots == 1  # not even one fits: one, and the load below says why
            with pytest.raises(CapacityExhausted) as refused:
                await client.load_model(sha, 0, 120, "")
            message = str(refused.value)
            assert "whole model" in message and "MiB" in message and "--memory-limit" in message
            assert (await client.info()).models == ()
            # It goes on serving: a stage that fits its budget loads, and one that does not is refused.
            held = await client.load_stage(sha, STAGE, n_ctx=64, slots=1, timeout_s=120)
            assert held.layers == STAGE
            with pytest.raises(CapacityExhausted, match="MiB"):
                await client.load_stage(sha, LayerRange(0, 30), n_ctx=2048, slots=1, timeout_s=120)
            assert [s.layers for s in (await client.info()).stages] == [STAGE]

    asyncio.run(scenario())


def test_role_replica_that_does_not_fit_its_limit_exits_2_with_one_line(
        launcher: Launcher, default_model: Path) -> None:
    proc = launcher.start("too-small", ["node", "--model", str(default_model), "--name", "too-small", "--port", "0",
                                        "--metrics-port", "0", "--step-port", "0", "--threads", "1",
                                        "--role", "replica", "--memory-limit", "60MB"], wait_ready=False)
    assert proc.popen.wait(timeout=120) == 2
    log = proc.log()
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if "ERROR" in line or "error:" in line.lower()]
    assert len(errors) == 1, log
    assert "--role replica" in errors[0] and "MiB" in errors[0] and "--memory-limit" in errors[0]
    assert not (launcher.workdir / "too-small.ready").exists()


def test_role_stage_refuses_load_model(stage_node: Proc, sha: str, module_launcher: Launcher) -> None:
    async def scenario() -> None:
        async with client_of(stage_node, module_launcher.cluster_key) as client:
            assert (await client.info()).stage_only
            with pytest.raises(InvalidInput, match="--role stage"):
                await client.load_model(sha, 0, 120, "")
            info = await client.info()
            assert info.models == () and info.stage_only

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- stages


def test_release_holding_frees_a_stage(small_node: Proc, sha: str, module_launcher: Launcher) -> None:
    key = module_launcher.cluster_key

    async def scenario() -> None:
        async with client_of(small_node, key) as client:
            await client.load_stage(sha, STAGE, n_ctx=64, slots=1, timeout_s=120)  # held already, or loaded now
            assert metric(small_node, "edgemesh_node_layers_held") == STAGE.count
            assert await release(small_node, key, sha, STAGE) == (True, False)
            assert (await client.info()).stages == ()
            assert metric(small_node, "edgemesh_node_layers_held") == 0
            assert await release(small_node, key, sha, STAGE) == (False, False)  # absent: nothing to do
            assert await client.release_holding(sha, STAGE, "") == "absent"

    asyncio.run(scenario())


def test_release_of_a_stage_with_an_open_session_is_pending_until_it_ends(
        small_node: Proc, sha: str, module_launcher: Launcher) -> None:
    import numpy as np

    from mesh.types import StageStep

    key = module_launcher.cluster_key

    async def scenario() -> None:
        async with client_of(small_node, key) as client:
            await client.load_stage(sha, STAGE, n_ctx=64, slots=2, timeout_s=120)
            step = StageStep(session_id="open", model_sha256=ModelSha(sha), layers=STAGE, start_position=0,
                             tokens=None, hidden=np.zeros((2, 576), dtype=np.float32),
                             sampling=SamplingParams(temperature=0.0), logprobs=False, reply_dtype="f32", step=1)
            stream = client.open_forward(step_timeout_s=30)
            try:
                await stream.step(step)
                assert await release(small_node, key, sha, STAGE) == (False, True)
                assert (await client.info()).stages == ()  # no longer offered to new sessions
                assert metric(small_node, "edgemesh_node_stage_memory_bytes", 'kind="weights"') > 0  # still held
            finally:
                stream.close()
            deadline = asyncio.get_running_loop().time() + 10
            while metric(small_node, "edgemesh_node_stage_memory_bytes", 'kind="weights"') != 0:
                assert asyncio.get_running_loop().time() < deadline, "the stage was not freed with its session"
                await asyncio.sleep(0.1)
            assert await release(small_node, key, sha, STAGE) == (False, False)

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- claims


def test_a_claim_lets_only_its_holder_load_and_release(stage_node: Proc, sha: str, module_launcher: Launcher) -> None:
    async def scenario() -> None:
        async with client_of(stage_node, module_launcher.cluster_key) as client:
            try:
                assert await client.claim(sha, "gw-a", 30.0) == (True, "gw-a", 30.0)
                granted, holder, left = await client.claim(sha, "gw-b", 30.0)
                assert (granted, holder) == (False, "gw-a") and 0 < left <= 30
                claims = (await client.info()).claims
                assert [(c.model_sha256, c.controller_id) for c in claims] == [(sha, "gw-a")]

                with pytest.raises(NotClaimHolder, match="gw-a"):
                    await client.load_stage(sha, STAGE, n_ctx=64, slots=1, timeout_s=120, controller_id="gw-b")
                with pytest.raises(NotClaimHolder, match="without a controller id"):
                    await client.load_stage(sha, STAGE, n_ctx=64, slots=1, timeout_s=120)
                assert (await client.info()).stages == ()
                held = await client.load_stage(sha, STAGE, n_ctx=64, slots=1, timeout_s=120, controller_id="gw-a")
                assert held.layers == STAGE
                for other in ("gw-b", ""):
                    with pytest.raises(NotClaimHolder):
                        await client.release_holding(sha, STAGE, other)
                assert [s.layers for s in (await client.info()).stages] == [STAGE]

                await client.claim(sha, "gw-a", 0.0, give_up=True)
                assert (await client.info()).claims == ()
                again = await client.load_stage(sha, STAGE, n_ctx=64, slots=1, timeout_s=120, controller_id="gw-b")
                assert again == held  # the same stage, not loaded twice
                assert await client.release_holding(sha, STAGE, "gw-b") == "released"
                assert (await client.info()).stages == ()
            finally:
                await client.claim(sha, "gw-a", 0.0, give_up=True)

    asyncio.run(scenario())


def test_a_claim_guards_the_replica_too(auto_node: Proc, sha: str, module_launcher: Launcher) -> None:
    async def scenario() -> None:
        async with client_of(auto_node, module_launcher.cluster_key) as client:
            try:
                assert (await client.claim(sha, "gw-a", 30.0))[0]
                for other in ("gw-b", ""):
                    with pytest.raises(NotClaimHolder):
                        await client.load_model(sha, 0, 120, other)
                    with pytest.raises(NotClaimHolder):
                        await client.release_holding(sha, None, other)
                assert (await client.info()).models == ()
            finally:
                await client.claim(sha, "gw-a", 0.0, give_up=True)
            assert (await client.info()).claims == ()

    asyncio.run(scenario())


def test_a_claim_lapses_when_not_renewed(stage_node: Proc, sha: str, module_launcher: Launcher) -> None:
    async def scenario() -> None:
        async with client_of(stage_node, module_launcher.cluster_key) as client:
            try:
                assert (await client.claim(sha, "gw-a", 0.5))[0]
                assert not (await client.claim(sha, "gw-b", 30.0))[0]
                await asyncio.sleep(0.8)
                assert await client.claim(sha, "gw-b", 30.0) == (True, "gw-b", 30.0)
            finally:
                await client.claim(sha, "gw-b", 0.0, give_up=True)
            assert (await client.info()).claims == ()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- bad input


def _cases(sha: str) -> Iterator[tuple[str, str, Any]]:
    yield "Claim: empty sha", "Claim", pb.ClaimRequest(model_sha256="", controller_id="gw-a", ttl_s=10)
    yield "Claim: no controller", "Claim", pb.ClaimRequest(model_sha256=sha, controller_id="", ttl_s=10)
    yield "Claim: ttl 0", "Claim", pb.ClaimRequest(model_sha256=sha, controller_id="gw-a", ttl_s=0)
    yield "Claim: ttl too long", "Claim", pb.ClaimRequest(model_sha256=sha, controller_id="gw-a", ttl_s=1e6)
    yield "Claim: ttl negative", "Claim", pb.ClaimRequest(model_sha256=sha, controller_id="gw-a", ttl_s=-5)
    yield "Claim: id too long", "Claim", pb.ClaimRequest(model_sha256=sha, controller_id="x" * 65, ttl_s=10)
    yield "LoadStage: no layers", "LoadStage", pb.LoadStageRequest(model_sha256=sha, n_ctx=64, slots=1)
    yield "LoadStage: past the model", "LoadStage", pb.LoadStageRequest(
        model_sha256=sha, layers=pb.LayerRange(first=20, last_exclusive=31), n_ctx=64, slots=1)
    yield "LoadStage: reversed layers", "LoadStage", pb.LoadStageRequest(
        model_sha256=sha, layers=pb.LayerRange(first=12, last_exclusive=10), n_ctx=64, slots=1)
    yield "LoadStage: no slots", "LoadStage", pb.LoadStageRequest(
        model_sha256=sha, layers=pb.LayerRange(first=10, last_exclusive=15), n_ctx=64, slots=0)
    yield "LoadStage: no context", "LoadStage", pb.LoadStageRequest(
        model_sha256=sha, layers=pb.LayerRange(first=10, last_exclusive=15), n_ctx=0, slots=1)
    yield "LoadModel: context too long", "LoadModel", pb.LoadModelRequest(model_sha256=sha, n_ctx=10**6)
    yield "ReleaseHolding: empty sha", "ReleaseHolding", pb.ReleaseHoldingRequest(model_sha256="", replica=True)
    yield "ReleaseHolding: no layers", "ReleaseHolding", pb.ReleaseHoldingRequest(model_sha256=sha)
    yield "ReleaseHolding: bad layers", "ReleaseHolding", pb.ReleaseHoldingRequest(
        model_sha256=sha, layers=pb.LayerRange(first=5, last_exclusive=5))


def test_bad_input_gets_invalid_argument_and_the_node_serves_on(auto_node: Proc, sha: str,
                                                                 module_launcher: Launcher) -> None:
    key = module_launcher.cluster_key

    async def scenario() -> None:
        answers = {name: await raw_code(auto_node, key, method, msg) for name, method, msg in _cases(sha)}
        wrong = {name: code.name for name, (code, _) in answers.items() if code != grpc.StatusCode.INVALID_ARGUMENT}
        assert not wrong
        assert all(detail for _code, detail in answers.values())  # each says what is wrong
        async with client_of(auto_node, key) as client:
            info = await client.info()
            assert info.stages == () and info.models == () and info.claims == ()
            await client.load_stage(sha, STAGE, n_ctx=64, slots=1, timeout_s=120)
            assert await client.release_holding(sha, STAGE, "") == "released"

    asyncio.run(scenario())


@pytest.mark.parametrize("method", ["LoadModel", "LoadStage"])
def test_a_load_naming_no_model_is_invalid_input(method: str, auto_node: Proc, module_launcher: Launcher) -> None:
    request_pb = pb.LoadModelRequest(model_sha256="", n_ctx=64) if method == "LoadModel" else \
        pb.LoadStageRequest(model_sha256="", layers=pb.LayerRange(first=10, last_exclusive=15), n_ctx=64, slots=1)
    code, detail = asyncio.run(raw_code(auto_node, module_launcher.cluster_key, method, request_pb))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, detail)


def test_a_load_of_a_model_the_node_has_not_is_not_found(auto_node: Proc, module_launcher: Launcher) -> None:
    async def scenario() -> None:
        async with client_of(auto_node, module_launcher.cluster_key) as client:
            with pytest.raises(NotFound, match="no file"):
                await client.load_model("f" * 64, 0, 30, "")
            with pytest.raises(NotFound, match="no file"):
                await client.load_stage("f" * 64, STAGE, n_ctx=64, slots=1, timeout_s=30)

    asyncio.run(scenario())
