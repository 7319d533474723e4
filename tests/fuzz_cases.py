"""Fuzz cases for every surface a node or a gateway shows a peer or a client, shared by
benchmarks/fuzz.py (10,000 cases per surface) and tests/integration/test_fuzz_sample.py
(a seeded sample on every test run).

Surfaces:
  grpc   every method of edgemesh.v1.Node, with well-formed random messages built from the
         message descriptors, and with raw random bytes as the request; signed with the
         cluster key or deliberately not.
  step   the step socket: raw bytes before the handshake, random frames and random
         ForwardRequest payloads after a correct one.
  http   the gateway's OpenAI routes (and the /api/* ones): random JSON, mutated valid
         bodies, raw bytes with a JSON content type.
  gguf   node.gguf.inspect (and the stage engine's own header reader) on mutated copies of
         a tiny GGUF file, in this process.

Why a seeded loop and not hypothesis: the cases run against live processes whose state
they change (a load, a claim, a release), so hypothesis's shrinking would replay cases
against a different node than the one that failed. Instead every case draws from its own
`random.Random(f"{seed}:{surface}:{index}")`: a failure is reproduced by its (seed,
surface, index) alone (`benchmarks/fuzz.py --surface S --seed N --case I`), against any
fresh mesh, because a case's draws never depend on the mesh's concrete values (ports,
ids, digests are substituted after drawing). A replayed case meets a node in its starting
state; one that failed only after what earlier cases did to the node (a claim, a reload)
is reproduced by the run up to it (`--cases I+1`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import random
import shutil
import socket
import ssl
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import descriptor as pbd
from google.protobuf import message as pbm
from google.protobuf import text_format

from mesh.transport import auth, hidden_wire
from mesh.transport import step_socket as wire
from mesh.transport.channels import SERVICE
from mesh.transport.generated import edgemesh_pb2 as pb
from tests.conftest import Launcher, Proc, gateway_url
from tests.fixtures.node_wire import node_channel, step_socket

SURFACES = ("grpc", "step", "http", "gguf")

# What a node may answer to any call: a typed refusal. UNKNOWN and INTERNAL mean a bug let an
# exception escape; CANCELLED/ABORTED/DATA_LOSS/UNIMPLEMENTED are not ours to send either.
ALLOWED_CODES = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OUT_OF_RANGE,
})
ALLOWED_CODE_NAMES = frozenset(c.name for c in ALLOWED_CODES)
CALL_DEADLINE_S = 3.0  # every fuzz call's deadline: the tiny model answers anything legitimate in far less
ANSWER_WAIT_S = 3.0  # how long a step socket may take to answer a complete frame
PARTIAL_WAIT_S = 0.2  # how long a case that sent an incomplete frame listens before it hangs up
MAX_STREAM_REPLIES = 40_000  # a reply stream longer than this is a runaway, not an answer


def case_rng(seed: int, surface: str, index: int) -> random.Random:
    return random.Random(f"{seed}:{surface}:{index}")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc/PID/status VmRSS."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@dataclass(frozen=True)
class Verdict:
    """What one case did: `problem` is empty when the answer was one the surface may give."""

    description: str
    problem: str = ""
    outcome: str = ""  # e.g. "INVALID_ARGUMENT", "200", "ModelError", for the tallies


@dataclass
class SurfaceReport:
    """Mutable tallies of one surface's run."""

    surface: str
    seed: int
    cases: int = 0
    failures: list[tuple[int, Verdict]] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    slowest: tuple[float, int, str] = (0.0, -1, "")
    seconds: float = 0.0
    memory: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name -> (before, peak, after) RSS
    threads: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (before, after)
    notes: list[str] = field(default_factory=list)

    def add(self, index: int, verdict: Verdict, seconds: float) -> None:
        self.cases += 1
        self.seconds += seconds
        key = verdict.outcome or "?"
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        if verdict.problem:
            self.failures.append((index, verdict))
        if seconds > self.slowest[0]:
            self.slowest = (seconds, index, verdict.description)

    def reproducer(self, index: int) -> str:
        return f"benchmarks/fuzz.py --surface {self.surface} --seed {self.seed} --case {index}"


def short(text: str, limit: int = 300) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


# ============================================================================ the mesh under test

CHAT_TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")


def write_chat_model(directory: Path) -> Path:
    """The tiny llama fixture with a chat template added, so that the gateway's chat route
    renders a template as it does with a real model, at a fraction of the cost."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    from tests.fixtures.tiny_gguf import SPECS, write_tiny_gguf

    directory.mkdir(parents=True, exist_ok=True)
    plain = write_tiny_gguf(directory / "tiny-plain.gguf", SPECS[0])
    out = directory / "tiny-chat.gguf"
    reader = gguf.GGUFReader(str(plain), "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(str(out), arch=arch, endianess=reader.endianess)
    template = MetadataDetails(gguf.GGUFValueType.STRING, CHAT_TEMPLATE)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the copy's progress bar is noise in a test log
    with contextlib.redirect_stderr(io.StringIO()):
        copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: template}, [])
    return out


@dataclass(frozen=True)
class Target:
    """The concrete values cases aim at: a node's model, ids and addresses."""

    sha: str
    node_id: str
    address: str  # the fuzzed node's gRPC host:port
    step_port: int
    n_vocab: int
    n_embd: int
    n_layers: int
    file_bytes: int
    n_ctx: int
    stages: tuple[tuple[int, int], ...]  # layer ranges the node holds at the start of every case batch
    silent_address: str  # a listener that accepts and never says a word
    cluster_key: str


STAGE_SHAPE = {"n_ctx": 256, "slots": 4}
REPLICA_CTX = 2048


class SilentListener:
    """A TCP listener that never answers: the one legitimate way for a case to make the node
    wait (a pipeline stage at that address is given Timeouts.info_rpc_s to answer)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class FuzzMesh:
    """The processes a fuzz run attacks: `node` (gRPC and step socket cases; no gateway drives
    it, so no placement claim stands in the cases' way), and `gateway` with its own `backend`
    node for the HTTP cases."""

    launcher: Launcher
    model: Path
    node: Proc
    backend: Proc | None
    gateway: Proc | None
    target: Target
    silent: SilentListener

    @property
    def gateway_url(self) -> str:
        assert self.gateway is not None
        return gateway_url(self.gateway)

    def close(self) -> None:
        self.silent.close()
        self.launcher.stop_all()


NODE_FLAGS = ("--role", "replica", "--memory-limit", "160MB", "--no-advertise", "--n-ctx", str(REPLICA_CTX))


def start_mesh(launcher: Launcher, model: Path, *, with_gateway: bool) -> FuzzMesh:
    node = launcher.node("fuzz-node", model, *NODE_FLAGS)
    backend = gateway = None
    if with_gateway:
        backend = launcher.node("fuzz-backend", model, *NODE_FLAGS)
        gateway = launcher.gateway("fuzz-gateway", model, "--no-discovery", "--peer", f"127.0.0.1:{backend.ready[1]}")
    silent = SilentListener()
    target = asyncio.run(_describe(node, model, launcher.cluster_key, silent.address))
    mesh = FuzzMesh(launcher, model, node, backend, gateway, target, silent)
    asyncio.run(restore_node(target))
    if gateway is not None:
        wait_for_gateway(mesh.gateway_url)
    return mesh


async def _describe(node: Proc, model: Path, key: str, silent_address: str) -> Target:
    from mesh.config import Limits, Timeouts
    from mesh.transport.channels import NodeClient
    from node.gguf import inspect

    summary = inspect(model)
    client = NodeClient(f"127.0.0.1:{node.ready[1]}", key, Timeouts(), Limits())
    try:
        info = await client.info()
    finally:
        await client.close()
    (held,) = info.models
    n = summary.n_layers
    return Target(sha=held.sha256, node_id=info.node_id, address=client.address, step_port=info.step_port,
                  n_vocab=summary.n_vocab, n_embd=summary.n_embd, n_layers=n, file_bytes=summary.file_bytes,
                  n_ctx=REPLICA_CTX, stages=((0, n), (0, 1), (1, n)), silent_address=silent_address,
                  cluster_key=key)


def wait_for_gateway(url: str, timeout_s: float = 60.0) -> None:
    """Until the gateway answers a normal completion (its placement has adopted the backend)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            got = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
            if got.status_code == 200:
                return
            last = got.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"the gateway at {url} serves no completion: {last[:500]}")


async def restore_node(target: Target) -> None:
    """Put the fuzzed node back in the state cases start from: no claims, the replica with its
    context, the baseline stages with their shape, nothing else loaded. Fuzz cases may
    legitimately release, reshape or claim; without this the later cases would only ever
    meet a node that holds nothing."""
    from mesh.config import Limits, Timeouts
    from mesh.transport.channels import NodeClient
    from mesh.types import LayerRange, ModelSha

    client = NodeClient(target.address, target.cluster_key, Timeouts(), Limits())
    try:
        info = await client.info()
        for claim in info.claims:
            await client.claim(claim.model_sha256, claim.controller_id, 1.0, give_up=True)
        baseline = {(target.sha, a, b) for a, b in target.stages}
        for stage in info.stages:
            key = (stage.model_sha256, stage.layers.first, stage.layers.last_exclusive)
            if key not in baseline:
                await client.release_holding(stage.model_sha256, stage.layers, "")
        if not any(m.sha256 == target.sha and m.n_ctx == target.n_ctx for m in info.models):
            await client.load_model(target.sha, target.n_ctx, 60, "")
        for a, b in target.stages:
            await client.load_stage(ModelSha(target.sha), LayerRange(a, b), timeout_s=60, **STAGE_SHAPE)
    finally:
        await client.close()


# ============================================================================ random values


def _ascii(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.randrange(32, 127)) for _ in range(n))


UNICODE_BITS = ("é", "☃", "😀", "\u0000", "\u202e", "\ufeff", "\U0010ffff", "ß", "\u0301", "中文", "\r\n", "\t",
                "<|endoftext|>", "{{ 7*7 }}", "{% for x in range(10) %}x{% endfor %}", "\\", '"', "'")


def random_text(rng: random.Random, max_len: int = 40) -> str:
    """A string that is sometimes plain ASCII, sometimes unicode, control characters or template syntax."""
    kind = rng.random()
    if kind < 0.15:
        return ""
    if kind < 0.55:
        return _ascii(rng, rng.randrange(1, max_len + 1))
    if kind < 0.9:
        return "".join(rng.choice(UNICODE_BITS) if rng.random() < 0.4 else _ascii(rng, rng.randrange(1, 6))
                       for _ in range(rng.randrange(1, 8)))
    # any code point; lone surrogates (which no UTF-8 string may hold) become "?"
    text = "".join(chr(rng.randrange(0x20, 0x10FFFF)) for _ in range(rng.randrange(1, max_len + 1)))
    return text.encode("utf-8", "replace").decode("utf-8")


def random_bytes(rng: random.Random, max_len: int = 256) -> bytes:
    n = rng.choice((0, 1, rng.randrange(max_len + 1), max_len))
    return rng.randbytes(n)


INT_EDGES = (0, 1, 2, 7, 255, 256, 4096, 4097, 65535, 2**31 - 1, 2**31, 2**32 - 1)
FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e38, -1e38, 3.4e38, float("nan"), float("inf"), float("-inf"))


def _int_for(rng: random.Random, ftype: int) -> int:
    signed = ftype in (pbd.FieldDescriptor.TYPE_INT32, pbd.FieldDescriptor.TYPE_INT64,
                       pbd.FieldDescriptor.TYPE_SINT32, pbd.FieldDescriptor.TYPE_SINT64,
                       pbd.FieldDescriptor.TYPE_SFIXED32, pbd.FieldDescriptor.TYPE_SFIXED64)
    wide = ftype in (pbd.FieldDescriptor.TYPE_INT64, pbd.FieldDescriptor.TYPE_UINT64,
                     pbd.FieldDescriptor.TYPE_SINT64, pbd.FieldDescriptor.TYPE_FIXED64,
                     pbd.FieldDescriptor.TYPE_SFIXED64)
    bits = 64 if wide else 32
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    pick = rng.random()
    if pick < 0.5:
        value = rng.choice(INT_EDGES)
    elif pick < 0.8:
        value = rng.randrange(0, 64)
    elif pick < 0.9:
        value = rng.choice((lo, hi))
    else:
        value = rng.randrange(lo, hi + 1)
    return max(lo, min(hi, value))


def _float(rng: random.Random, typical: tuple[float, float] = (0.0, 2.0)) -> float:
    if rng.random() < 0.6:
        return rng.uniform(*typical)
    return rng.choice(FLOAT_EDGES)


# ============================================================================ random protobuf messages

TOKEN_FIELDS = frozenset({"prompt_tokens", "stop_token_ids", "replay_tokens", "ids", "history_tokens"})
SESSIONS = ("fuzz-s1", "fuzz-s2", "fuzz-s3")
CONTROLLERS = ("", "fuzz-controller-a", "fuzz-controller-b")


class MessageMaker:
    """Random well-formed protobuf messages of any type, built from the message descriptor:
    scalars of every kind (edge values, NaN and infinities), strings (unicode included), bytes,
    enums with unknown values, repeated fields of bounded length and nested messages. Fields
    known by name are biased towards values the node takes (its model's sha256, its node id,
    a layer range it holds, valid token ids, hidden states of the model's width), so that the
    cases reach past the first validation into the engines, while staying sometimes absurd."""

    MAX_DEPTH = 5

    def __init__(self, rng: random.Random, target: Target) -> None:
        self.rng = rng
        self.t = target

    def message(self, descriptor: Any, depth: int = 0) -> pbm.Message:
        """At the top level, half the time a request the node would serve with one or two of
        its fields (or its sub-messages' fields) redrawn at random: random messages alone
        almost never get past the first check, and the code behind it is what a fuzzer is
        for. Otherwise, and for nested messages, every field random."""
        from google.protobuf import message_factory

        msg = message_factory.GetMessageClass(descriptor)()
        build = PLAUSIBLE.get(descriptor.name)
        if depth == 0 and build is not None and self.rng.random() < 0.5:
            build(self, msg)
            for _ in range(self.rng.choice((0, 1, 1, 2))):
                self.mutate(msg)
        else:
            self.fill(msg, depth)
        return msg

    def mutate(self, msg: pbm.Message) -> None:
        """Redraw one field of `msg`, or of a sub-message that is set, at random."""
        rng = self.rng
        holders = [msg] + [getattr(msg, fd.name) for fd in msg.DESCRIPTOR.fields
                           if fd.type == pbd.FieldDescriptor.TYPE_MESSAGE and not fd.is_repeated
                           and msg.HasField(fd.name)]
        target = rng.choice(holders)
        fd = rng.choice(target.DESCRIPTOR.fields)
        target.ClearField(fd.name)
        if rng.random() < 0.15:
            return  # left unset
        self._fill_field(target, fd, 1)

    def fill(self, msg: pbm.Message, depth: int) -> None:
        rng = self.rng
        descriptor = msg.DESCRIPTOR
        oneof_pick = {o.name: rng.choice([*o.fields, None]) for o in descriptor.oneofs}
        for fd in descriptor.fields:
            if fd.containing_oneof is not None and oneof_pick[fd.containing_oneof.name] is not fd:
                continue
            if fd.containing_oneof is None and rng.random() < 0.2:
                continue  # left unset
            self._fill_field(msg, fd, depth)
        if descriptor.name == "Tensor" and rng.random() < 0.6:
            self._consistent_tensor(msg)

    def _fill_field(self, msg: pbm.Message, fd: Any, depth: int) -> None:
        if fd.is_repeated:
            self._repeated(msg, fd, depth)
        elif fd.type == pbd.FieldDescriptor.TYPE_MESSAGE:
            if depth < self.MAX_DEPTH:
                getattr(msg, fd.name).CopyFrom(self._sub_message(fd, depth + 1))
        else:
            setattr(msg, fd.name, self.scalar(fd))

    # -------------------------------------------------------------- requests the node would serve

    def tokens(self, n_max: int = 16) -> list[int]:
        return [self.rng.randrange(self.t.n_vocab) for _ in range(self.rng.randrange(1, n_max + 1))]

    def sampling(self, msg: Any) -> None:
        rng = self.rng
        msg.temperature = rng.choice((0.0, 0.0, 0.7, 1.3))
        msg.top_p = rng.choice((0.0, 0.9, 1.0))
        msg.top_k = rng.choice((0, 1, 40))
        msg.min_p = rng.choice((0.0, 0.05))
        msg.repeat_penalty = rng.choice((0.0, 1.0, 1.1))
        msg.seed = rng.randrange(2**63)
        msg.repeat_last_n = rng.choice((0, 64))
        msg.frequency_penalty = rng.choice((0.0, 0.0, 0.5, -1.0))
        msg.presence_penalty = rng.choice((0.0, 0.0, 1.5))
        for _ in range(rng.choice((0, 0, 1, 3))):
            msg.logit_bias.add(token_id=rng.randrange(self.t.n_vocab), bias=rng.uniform(-100, 100))

    def generate_request(self, msg: Any) -> None:
        rng = self.rng
        msg.request_id = f"fuzz-{rng.randrange(10**6)}"
        msg.model_sha256 = self.t.sha if rng.random() < 0.9 else ""
        msg.prompt_tokens.extend(self.tokens())
        self.sampling(msg.sampling)
        msg.max_tokens = rng.randrange(1, 17)
        msg.stop_token_ids.extend(rng.sample(range(self.t.n_vocab), rng.randrange(0, 3)))
        msg.logprobs = rng.random() < 0.5
        msg.top_logprobs = rng.choice((0, 0, 1, 20))
        if rng.random() < 0.2:
            msg.replay_tokens.extend(self.tokens(4))

    def forward_steps(self, count: int) -> list[Any]:
        """`count` consecutive steps of one session through one loaded stage."""
        rng = self.rng
        first, last = rng.choice(self.t.stages)
        session = rng.choice(SESSIONS)
        position = 0
        steps = []
        for index in range(count):
            msg = pb.ForwardRequest(session_id=session, start_position=position, model_sha256=self.t.sha,
                                    step=index + 1, logprobs=rng.random() < 0.5,
                                    reply_dtype=rng.choice((pb.DTYPE_UNSPECIFIED, pb.DTYPE_F32, pb.DTYPE_F16,
                                                            pb.DTYPE_Q8_0, pb.DTYPE_AUTO)))
            msg.layers.first, msg.layers.last_exclusive = first, last
            n = rng.randrange(1, 9) if index == 0 else 1  # a prefill chunk, then decode steps
            if first == 0:
                msg.tokens.ids.extend(self.tokens(n)[:n])
                n = len(msg.tokens.ids)
            else:
                self._consistent_tensor(msg.hidden)
                n = msg.hidden.shape[0]
            self.sampling(msg.sampling)
            if rng.random() < 0.3:
                msg.history_tokens.extend(self.tokens(8))
            position += n
            steps.append(msg)
        return steps

    def hops(self, msg: Any) -> None:
        self._plausible_hops(msg)


    def _sub_message(self, fd: Any, depth: int) -> pbm.Message:
        sub = self.message(fd.message_type, depth)
        if fd.message_type.name == "LayerRange" and self.rng.random() < 0.7:
            first, last = self.rng.choice(self.t.stages)
            sub.Clear()
            sub.first, sub.last_exclusive = first, last
        return sub

    def _length(self) -> int:
        pick = self.rng.random()
        if pick < 0.15:
            return 0
        if pick < 0.85:
            return self.rng.randrange(1, 9)
        if pick < 0.97:
            return self.rng.randrange(9, 300)
        if pick < 0.997:
            return self.rng.choice((4096, 4097, 5000))
        return self.rng.choice((20_000, 100_000))  # rare: past every bound a message may meet

    def _repeated(self, msg: pbm.Message, fd: Any, depth: int) -> None:
        rng = self.rng
        n = self._length()
        huge = n > 5000  # rare: kept whole, so that every bound on a repeated field is met
        if fd.type == pbd.FieldDescriptor.TYPE_MESSAGE:
            if not huge or fd.name not in ("stages", "ranges"):
                n = min(n, 70) if fd.name == "stages" else min(n, 8)
            if depth >= self.MAX_DEPTH:
                return
            for _ in range(n):
                getattr(msg, fd.name).add().CopyFrom(self._sub_message(fd, depth + 1))
            if fd.name == "stages" and rng.random() < 0.6:
                self._plausible_hops(msg)
            return
        if fd.name in TOKEN_FIELDS:
            valid = rng.random() < 0.75
            values = [rng.randrange(self.t.n_vocab) if valid or rng.random() < 0.5 else _int_for(rng, fd.type)
                      for _ in range(n)]
            getattr(msg, fd.name).extend(values)
            return
        if fd.name == "shape":
            getattr(msg, fd.name).extend(_int_for(rng, fd.type) for _ in range(n if huge else min(n, 6)))
            return
        getattr(msg, fd.name).extend(self.scalar(fd) for _ in range(n if huge else min(n, 32)))

    def _plausible_hops(self, msg: Any) -> None:
        """A pipeline the node could head: it as stage 0 on a layer range it holds, then
        later stages at its own address, a closed port, a silent listener or junk."""
        rng = self.rng
        del msg.stages[:]
        first = rng.choice(self.t.stages)
        bounds = [first] if first[1] == self.t.n_layers or rng.random() < 0.2 else [first, (first[1], self.t.n_layers)]
        for index, (a, b) in enumerate(bounds):
            hop = msg.stages.add()
            hop.layers.first, hop.layers.last_exclusive = a, b
            hop.node_id = self.t.node_id if index == 0 or rng.random() < 0.8 else _ascii(rng, 16)
            hop.address = self.t.address if index == 0 else self._address()

    def _address(self) -> str:
        pick = self.rng.random()
        if pick < 0.75:
            return self.t.address
        if pick < 0.85:
            return "127.0.0.1:1"  # nothing listens: refused at once
        if pick < 0.87:
            return self.t.silent_address
        return self.rng.choice(("", ":", "127.0.0.1", "[::1", "host:99999", "127.0.0.1:-5", "a b:1",
                                _ascii(self.rng, 40), "x" * 300, "localhost:0"))

    def _consistent_tensor(self, msg: Any) -> None:
        """Hidden states of the right shape, dtype and byte count (sometimes with NaNs)."""
        import numpy as np

        rng = self.rng
        n = rng.randrange(1, 9)
        width = self.t.n_embd if rng.random() < 0.85 else rng.choice((1, self.t.n_embd + 1, 576))
        dtype = rng.choice((pb.DTYPE_F32, pb.DTYPE_F16, pb.DTYPE_Q8_0))
        values = np.random.default_rng(rng.randrange(2**32)).normal(size=(n, width))
        if rng.random() < 0.1:
            values[0, 0] = rng.choice((math.nan, math.inf))
        msg.Clear()
        msg.shape.extend((n, width))
        msg.dtype = dtype
        if dtype == pb.DTYPE_Q8_0:
            whole = values[:, : width // 32 * 32]  # a row that is not whole blocks gets a short payload
            msg.data = hidden_wire.encode_q8_0(whole.astype(np.float32)) if whole.size else b""
        else:
            numpy_type = np.float32 if dtype == pb.DTYPE_F32 else np.float16
            msg.data = values.astype(np.dtype(numpy_type).newbyteorder("<")).tobytes()

    def scalar(self, fd: Any) -> Any:
        rng = self.rng
        name = fd.name
        t = fd.type
        if t == pbd.FieldDescriptor.TYPE_STRING:
            return self._string(name)
        if t == pbd.FieldDescriptor.TYPE_BYTES:
            return random_bytes(rng, 96 if name == "challenge" else 512)
        if t == pbd.FieldDescriptor.TYPE_BOOL:
            return rng.random() < 0.5
        if t == pbd.FieldDescriptor.TYPE_ENUM:
            known = list(fd.enum_type.values_by_number)
            return rng.choice(known) if rng.random() < 0.8 else rng.choice((3, 7, 2**31 - 1, -1, -2**31))
        if t in (pbd.FieldDescriptor.TYPE_FLOAT, pbd.FieldDescriptor.TYPE_DOUBLE):
            return self._number(name)
        value = self._count(name)
        return value if value is not None else _int_for(rng, t)

    def _string(self, name: str) -> str:
        rng = self.rng
        pick = rng.random()
        if "sha256" in name:
            if pick < 0.7:
                return self.t.sha
            if pick < 0.8:
                return "".join(rng.choice("0123456789abcdef") for _ in range(64))
            return random_text(rng, 80)
        if name == "node_id":
            return self.t.node_id if pick < 0.6 else random_text(rng, 70)
        if name == "address":
            return self._address()
        if name == "session_id":
            return rng.choice(SESSIONS) if pick < 0.8 else random_text(rng, 140)
        if name == "controller_id":
            return rng.choice(CONTROLLERS) if pick < 0.85 else random_text(rng, 70)
        if name == "shard_sources":
            return self._address()
        return random_text(rng, 200 if pick < 0.05 else 40)

    def _number(self, name: str) -> float:
        rng = self.rng
        if name == "step_timeout_s":
            return _float(rng, (0.2, 3.0))
        if name == "ttl_s":
            return _float(rng, (0.1, 5.0))
        if name in ("temperature", "min_p", "top_p"):
            return _float(rng, (0.0, 1.0))
        return _float(rng)

    def _count(self, name: str) -> int | None:
        """Small valid values for counts the node sizes work by; None: any integer."""
        rng = self.rng
        if rng.random() < 0.35:
            return None
        if name == "max_tokens":
            return rng.randrange(1, 33)
        if name == "n_ctx":
            return rng.choice((0, 16, 64, 256, self.t.n_ctx, 4096, 32768, 32769))
        if name == "slots":
            return rng.choice((0, 1, 2, 4, 64, 65))
        if name == "prefill_chunk":
            return rng.choice((0, 1, 8, 512, 513))
        if name in ("start_position", "position"):
            return rng.randrange(0, 300)
        if name in ("offset", "length"):
            return rng.randrange(0, self.t.file_bytes + 2)
        if name in ("first", "last_exclusive"):
            return rng.randrange(0, self.t.n_layers + 2)
        if name == "top_k":
            return rng.randrange(0, 50)
        if name == "repeat_last_n":
            return rng.randrange(0, 128)
        return None


def _plausible_info(maker: MessageMaker, msg: Any) -> None:
    msg.challenge = maker.rng.randbytes(maker.rng.choice((0, 16, 64)))


def _plausible_forward(maker: MessageMaker, msg: Any) -> None:
    msg.CopyFrom(maker.forward_steps(1)[0])


def _plausible_load_stage(maker: MessageMaker, msg: Any) -> None:
    rng = maker.rng
    first = rng.randrange(maker.t.n_layers)
    msg.model_sha256 = maker.t.sha
    msg.layers.first, msg.layers.last_exclusive = first, rng.randrange(first + 1, maker.t.n_layers + 1)
    msg.n_ctx = rng.choice((16, 64, 256, 1024))
    msg.slots = rng.choice((1, 2, 4))
    msg.prefill_chunk = rng.choice((0, 32, 512))


def _plausible_load_model(maker: MessageMaker, msg: Any) -> None:
    msg.model_sha256 = maker.t.sha
    msg.n_ctx = maker.rng.choice((0, 512, maker.t.n_ctx))


def _plausible_release(maker: MessageMaker, msg: Any) -> None:
    rng = maker.rng
    msg.model_sha256 = maker.t.sha
    if rng.random() < 0.3:
        msg.replica = True
    else:
        first, last = rng.choice(maker.t.stages)
        msg.layers.first, msg.layers.last_exclusive = first, last


def _plausible_claim(maker: MessageMaker, msg: Any) -> None:
    rng = maker.rng
    msg.model_sha256 = maker.t.sha
    msg.controller_id = rng.choice(CONTROLLERS[1:])
    msg.ttl_s = rng.uniform(0.5, 5.0)
    msg.give_up = rng.random() < 0.3


def _plausible_fetch(maker: MessageMaker, msg: Any) -> None:
    rng = maker.rng
    msg.model_sha256 = maker.t.sha
    msg.header = rng.random() < 0.3
    if rng.random() < 0.02:  # many tiny ranges: few bytes in all, but a reply per range
        for _ in range(rng.choice((5000, 20_000, 100_000))):
            msg.ranges.add(offset=rng.randrange(maker.t.file_bytes), length=1)
        return
    for _ in range(rng.randrange(0 if msg.header else 1, 4)):
        offset = rng.randrange(maker.t.file_bytes)
        msg.ranges.add(offset=offset, length=rng.randrange(1, min(2**20, maker.t.file_bytes - offset) + 1))


def _plausible_pipeline(maker: MessageMaker, msg: Any) -> None:
    rng = maker.rng
    maker.generate_request(msg.request)
    msg.request.model_sha256 = maker.t.sha
    maker.hops(msg)
    msg.n_ctx = rng.choice((64, 256))
    msg.step_timeout_s = rng.uniform(0.5, 2.5)


def _plausible_embed(maker: MessageMaker, msg: Any) -> None:
    rng = maker.rng
    msg.model_sha256 = maker.t.sha if rng.random() < 0.8 else rng.choice(("", "0" * 64))
    for _ in range(rng.choice((0, 1, 2, 3, 17))):  # 17: over the batch the node takes
        msg.inputs.add().ids.extend(maker.tokens(rng.choice((8, 64, maker.t.n_ctx + 8))))


PLAUSIBLE: dict[str, Callable[[MessageMaker, Any], None]] = {
    "InfoRequest": _plausible_info, "GenerateRequest": MessageMaker.generate_request,
    "ForwardRequest": _plausible_forward, "LoadStageRequest": _plausible_load_stage,
    "LoadModelRequest": _plausible_load_model, "ReleaseHoldingRequest": _plausible_release,
    "ClaimRequest": _plausible_claim, "FetchShardRequest": _plausible_fetch,
    "RunPipelineRequest": _plausible_pipeline,
    "EmbedRequest": _plausible_embed,
}


# ============================================================================ surface: gRPC

NODE_SERVICE = pb.DESCRIPTOR.services_by_name["Node"]
METHODS = tuple(NODE_SERVICE.methods)
SIGNINGS = ("signed", "unsigned", "other-body", "stale", "future", "malformed", "wrong-key", "replayed")


@dataclass(frozen=True)
class GrpcCase:
    method: str
    requests: tuple[bytes, ...]  # one for every method but Forward (a stream of them)
    signing: str
    shown: str  # the request(s) as text, for the reproducer
    long_work: bool  # the case legitimately makes the node wait longer than the deadline (see below)

    def describe(self) -> str:
        return f"{self.method} [{self.signing}] {self.shown}"


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """A serialized message with a few bytes flipped, cut or inserted: mostly-valid wire
    format, which reaches deeper into the parser than noise does."""
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        pick = rng.random()
        if not buf or pick < 0.3:
            buf[rng.randrange(len(buf) + 1):rng.randrange(len(buf) + 1)] = rng.randbytes(rng.randrange(1, 9))
        elif pick < 0.6:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif pick < 0.8:
            del buf[rng.randrange(len(buf)):]
        else:
            i = rng.randrange(len(buf))
            buf[i] = rng.choice((0x00, 0x7F, 0x80, 0xFF, 0x08, 0x0A, 0x12, 0x1A))
    return bytes(buf)


def make_grpc_case(rng: random.Random, target: Target) -> GrpcCase:
    method = rng.choice(METHODS)
    streaming_in = method.client_streaming
    maker = MessageMaker(rng, target)
    raw = rng.random() < 0.3
    count = rng.randrange(1, 5) if streaming_in else 1
    requests: list[bytes] = []
    shown: list[str] = []
    long_work = False
    session = maker.forward_steps(count) if streaming_in and not raw and rng.random() < 0.5 else None
    for index in range(count):
        if session is not None:
            step = session[index]
            if rng.random() < 0.2:
                maker.mutate(step)
            requests.append(step.SerializeToString())
            shown.append(text_format.MessageToString(step, as_one_line=True))
        elif raw:
            if rng.random() < 0.5:
                body = _mutate_bytes(rng, maker.message(method.input_type).SerializeToString())
            else:
                body = random_bytes(rng, rng.choice((16, 256, 4096)))
            requests.append(body)
            shown.append(body[:200].hex() + (f"... ({len(body)} bytes)" if len(body) > 200 else ""))
        else:
            msg = maker.message(method.input_type)
            # A hop at the silent listener makes the head wait Timeouts.info_rpc_s (5 s) for that
            # node to prove itself: longer than the case's deadline, and what a real stage
            # behind a dead link costs too. Everything else the tiny model answers in well under it.
            long_work = long_work or (method.name == "RunPipeline"
                                      and any(h.address == target.silent_address for h in msg.stages))
            requests.append(msg.SerializeToString())
            shown.append(text_format.MessageToString(msg, as_one_line=True))
    signing = "signed" if rng.random() < (0.6 if raw else 0.92) else rng.choice(SIGNINGS[1:])
    if streaming_in and signing == "other-body":
        signing = "unsigned"  # a stream's body is not bound to its signature (see mesh.transport.auth)
    return GrpcCase(method.name, tuple(requests), signing, " | ".join(shown), long_work)


def _metadata(case: GrpcCase, key: str, rng: random.Random) -> tuple[tuple[str, str], ...]:
    path = SERVICE + case.method
    body = None if case.method == "Forward" else case.requests[0]
    if case.signing == "signed":
        return auth.sign(key, path, body)
    if case.signing in ("unsigned", "replayed"):
        return ()
    if case.signing == "other-body":
        return auth.sign(key, path, (body or b"") + b"\x00")
    if case.signing == "stale":
        return auth.sign(key, path, body, now=time.time() - 1000)
    if case.signing == "future":
        return auth.sign(key, path, body, now=time.time() + 1000)
    if case.signing == "wrong-key":
        return auth.sign(key + "-not", path, body)
    if case.signing == "malformed":
        good = dict(auth.sign(key, path, body))
        header = rng.choice(sorted(good))
        good[header] = rng.choice(("nan", "inf", "-1", "1e9", "", " ", "0x10", "1_000", _ascii(rng, 70)))
        return tuple(good.items())
    raise AssertionError(case.signing)


class GrpcFuzzer:
    """Runs gRPC cases against one node over one channel, with identity serializers (the
    requests are bytes already)."""

    def __init__(self, target: Target) -> None:
        from mesh.config import Limits, Timeouts
        from mesh.transport.channels import channel_options

        self.t = target
        self.channel = node_channel(target.address, target.cluster_key, channel_options(Timeouts(), Limits()))
        self._replayable: tuple[tuple[str, str], ...] = ()

    async def close(self) -> None:
        await self.channel.close(grace=None)

    async def run(self, case: GrpcCase, rng: random.Random) -> Verdict:
        method = next(m for m in METHODS if m.name == case.method)
        for attempt in range(3):
            if case.signing == "replayed":
                # The last signature this fuzzer sent with a signed call (its nonce is used up), or
                # none at all when no signed call went first: refused either way.
                metadata = self._replayable
            else:
                metadata = _metadata(case, self.t.cluster_key, rng)
            if case.signing == "signed" and case.method != "Forward":
                self._replayable = metadata
            # The client library's own verdict when its write of a stream's message races the
            # node's end of the call is INTERNAL "Internal error from Core" (the node never sends
            # that text): such a case runs again, and a refusal from the headers alone, which no
            # message can change, runs without messages then.
            headers_only = attempt > 0 and case.signing != "signed"
            code, details, replies = await self._call(case, method, metadata, send=not headers_only)
            if not (method.client_streaming and code == grpc.StatusCode.INTERNAL
                    and details == "Internal error from Core"):
                break
        if len(replies) > MAX_STREAM_REPLIES:
            return Verdict(case.describe(), f"more than {MAX_STREAM_REPLIES} replies", "runaway")
        return Verdict(case.describe(), self._judge(case, method, code, details, replies), code.name)

    async def _call(self, case: GrpcCase, method: Any, metadata: tuple[tuple[str, str], ...], *,
                    send: bool = True) -> tuple[grpc.StatusCode, str, list[bytes]]:
        path = SERVICE + case.method
        replies: list[bytes] = []
        try:
            if method.client_streaming:
                # One step, then its reply, as a head drives a stage (writing all of them ahead
                # fails the client's writes once the node has ended the call).
                stream = self.channel.stream_stream(path)(timeout=CALL_DEADLINE_S, metadata=metadata)
                with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                    for request in case.requests if send else ():
                        await stream.write(request)
                        reply = await stream.read()
                        if reply is grpc.aio.EOF:
                            break
                        replies.append(reply)
                    else:
                        await stream.done_writing()
                        while (reply := await stream.read()) is not grpc.aio.EOF:
                            replies.append(reply)
                code = await stream.code()
                return code, (await stream.details() or "") if code != grpc.StatusCode.OK else "", replies
            if method.server_streaming:
                call = self.channel.unary_stream(path)(case.requests[0], timeout=CALL_DEADLINE_S, metadata=metadata)
                async for reply in call:
                    replies.append(reply)
                    if len(replies) > MAX_STREAM_REPLIES:
                        call.cancel()
                        break
            else:
                replies.append(await self.channel.unary_unary(path)(case.requests[0], timeout=CALL_DEADLINE_S,
                                                                    metadata=metadata))
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or "", replies
        return grpc.StatusCode.OK, "", replies

    def _judge(self, case: GrpcCase, method: Any, code: grpc.StatusCode, details: str,
               replies: list[bytes]) -> str:
        if case.signing != "signed":
            if code != grpc.StatusCode.UNAUTHENTICATED:
                return f"a call with a {case.signing} signature got {code.name}, not UNAUTHENTICATED ({details})"
            return ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            # Allowed only for work the case asked for: a head waiting on a stage that never
            # answers, or tokens still streaming (each a step of the model). Anything else the
            # tiny model answers, and its 300 KB file ships, well within the deadline.
            if case.long_work or (replies and case.method in ("Generate", "RunPipeline")):
                return ""
            return f"no end within {CALL_DEADLINE_S}s after {len(replies)} replies"
        if code not in ALLOWED_CODES:
            return f"status {code.name}: {details}"
        if "metadata size exceeds" in details or len(details) > 2048:
            # The client library's verdict on a status message too large to receive: whatever
            # the node meant to say never reached the caller.
            return f"the node's answer did not reach the client: {short(details, 200)}"
        if code != grpc.StatusCode.OK and not details.strip():
            return f"status {code.name} without a message naming the problem"
        if code == grpc.StatusCode.OK:
            return self._check_replies(case, method, replies)
        return ""

    def _check_replies(self, case: GrpcCase, method: Any, replies: list[bytes]) -> str:
        from google.protobuf import message_factory

        reply_type = message_factory.GetMessageClass(method.output_type)
        try:
            parsed = [reply_type.FromString(r) for r in replies]
        except pbm.DecodeError as exc:
            return f"an OK reply that is not a {method.output_type.name}: {exc}"
        if case.method == "Info":
            request = pb.InfoRequest.FromString(case.requests[0])
            info = parsed[0]
            if info.proof != auth.node_proof(self.t.cluster_key, request.challenge, info.node_id):
                return "Info's proof does not answer the challenge"
        if case.method in ("Generate", "RunPipeline"):
            finished = [e for e in parsed if e.finish_reason]
            if any(e.token_id >= self.t.n_vocab for e in parsed):
                return "a generated token id outside the vocabulary"
            if parsed and (len(finished) != 1 or finished[0] is not parsed[-1]
                           or finished[0].finish_reason not in ("stop", "length")):
                return f"a token stream whose finish reasons are {[e.finish_reason for e in finished]}"
        return ""


async def node_still_serves(target: Target) -> str:
    """'' when the node answers a normal Info and a normal Generate (after restore_node), else why not."""
    from mesh.config import Limits, Timeouts
    from mesh.errors import EdgeMeshError
    from mesh.transport.channels import NodeClient
    from mesh.types import GenerationRequest, ModelSha, RequestId, SamplingParams

    try:
        await restore_node(target)
        client = NodeClient(target.address, target.cluster_key, Timeouts(), Limits())
        try:
            info = await client.info()
            if info.node_id != target.node_id or info.draining:
                return f"Info says {info}"
            request = GenerationRequest(request_id=RequestId("after-fuzz"), prompt_tokens=(1, 2, 3),
                                        sampling=SamplingParams(temperature=0.0), max_tokens=8,
                                        stop_token_ids=frozenset(), model_sha256=ModelSha(target.sha))
            tokens = [e async for e in client.generate(request)]
        finally:
            await client.close()
    except EdgeMeshError as exc:
        return f"{type(exc).__name__}: {exc}"
    if len(tokens) != 8 or tokens[-1].finish_reason != "length":
        return f"a normal Generate gave {tokens}"
    return ""


# ============================================================================ surface: step socket


@dataclass(frozen=True)
class StepCase:
    handshake: bool
    read_hello: bool
    frames: tuple[bytes, ...]  # what is written after the handshake (or instead of it)
    complete: tuple[bool, ...]  # whether each write is a whole frame the node must answer
    shown: str

    def describe(self) -> str:
        return f"{'after handshake' if self.handshake else 'no handshake'}: {self.shown}"


def _frame(kind: int, payload: bytes) -> bytes:
    return struct.pack(">IB", len(payload), kind) + payload


def _pre_handshake_bytes(rng: random.Random) -> tuple[bytes, bool, str]:
    """Bytes a peer without the key sends first, and whether the node has enough to refuse them."""
    pick = rng.random()
    proof_len = wire.NONCE_BYTES + wire.MAC_BYTES
    if pick < 0.3:
        data = random_bytes(rng, 600)
        return data, _handshake_decidable(data), f"noise {data[:64].hex()} ({len(data)} bytes)"
    if pick < 0.55:
        data = _frame(wire.PROOF, rng.randbytes(proof_len))  # a proof with a made-up MAC
        return data, True, "a PROOF frame with a random MAC"
    if pick < 0.75:
        kind = rng.choice((0, wire.HELLO, wire.STEP, wire.OUTPUT, wire.ERROR, 6, 255))
        payload = random_bytes(rng, 200)
        data = _frame(kind, payload)
        return data, True, f"a kind {kind} frame of {len(payload)} bytes"
    if pick < 0.9:
        length = rng.choice((0, 1, proof_len - 1, proof_len + 1, 2**31, 2**32 - 1))
        data = struct.pack(">IB", length, wire.PROOF) + rng.randbytes(rng.randrange(0, 60))
        return data, _handshake_decidable(data), f"a PROOF header claiming {length} bytes"
    data = _frame(wire.PROOF, rng.randbytes(proof_len)) + rng.randbytes(rng.randrange(1, 40))
    return data, True, "a PROOF frame with bytes after it"


def _handshake_decidable(data: bytes) -> bool:
    """Mirrors what the node can decide from what it got (mesh.transport.step_socket.NodeHandshake):
    a 5-byte header of another kind or length, or a whole proof, must be answered at once."""
    if len(data) < 5:
        return False
    length, kind = struct.unpack(">IB", data[:5])
    if kind != wire.PROOF or length != wire.NONCE_BYTES + wire.MAC_BYTES:
        return True
    return len(data) >= 5 + length


def make_step_case(rng: random.Random, target: Target) -> StepCase:
    if rng.random() < 0.3:
        data, decidable, shown = _pre_handshake_bytes(rng)
        return StepCase(False, rng.random() < 0.7, (data,), (decidable,), shown)
    maker = MessageMaker(rng, target)
    frames: list[bytes] = []
    complete: list[bool] = []
    shown: list[str] = []
    count = rng.randrange(1, 4)
    session = maker.forward_steps(count) if rng.random() < 0.4 else None
    for index in range(count):
        pick = rng.random()
        if session is not None and pick < 0.8:
            msg = session[index]
            if rng.random() < 0.2:
                maker.mutate(msg)
            frames.append(_frame(wire.STEP, msg.SerializeToString()))
            complete.append(True)
            shown.append("STEP " + short(text_format.MessageToString(msg, as_one_line=True), 400))
        elif pick < 0.6:
            msg = maker.message(pb.ForwardRequest.DESCRIPTOR)
            frames.append(_frame(wire.STEP, msg.SerializeToString()))
            complete.append(True)
            shown.append("STEP " + short(text_format.MessageToString(msg, as_one_line=True), 400))
        elif pick < 0.75:
            payload = _mutate_bytes(rng, maker.message(pb.ForwardRequest.DESCRIPTOR).SerializeToString())
            frames.append(_frame(wire.STEP, payload))
            complete.append(True)
            shown.append(f"STEP mutated {payload[:80].hex()}")
        elif pick < 0.87:
            kind = rng.choice((0, wire.HELLO, wire.PROOF, wire.OUTPUT, wire.ERROR, 9, 255))
            payload = random_bytes(rng, 300)
            frames.append(_frame(kind, payload))
            complete.append(True)
            shown.append(f"kind {kind} + {payload[:40].hex()}")
        elif pick < 0.94:
            length = rng.choice((2**26 + 1, 2**31, 2**32 - 1))  # past Limits.max_message_bytes
            frames.append(struct.pack(">IB", length, wire.STEP))
            complete.append(True)
            shown.append(f"a STEP header claiming {length} bytes")
        else:
            claimed = rng.randrange(10, 5000)
            frames.append(struct.pack(">IB", claimed, wire.STEP) + rng.randbytes(rng.randrange(0, 10)))
            complete.append(False)
            shown.append(f"a STEP frame cut short of its {claimed} bytes")
        if not complete[-1]:
            break
    return StepCase(True, True, tuple(frames), tuple(complete), " ; ".join(shown))


def _read_answer(sock: socket.socket, wait_s: float) -> tuple[str, bytes]:
    """('frame', kind+payload) / ('closed', b'') / ('silent', b'') within wait_s."""
    deadline = time.monotonic() + wait_s
    try:
        frame = wire.read_frame(sock, 2**26, deadline)
    except wire.ConnectionClosed:
        return "closed", b""
    except TimeoutError:
        return "silent", b""
    except (ConnectionError, ssl.SSLError):  # a reset, or TLS torn down without its close alert
        return "closed", b""
    return "frame", bytes([frame.kind]) + frame.payload


def run_step_case(case: StepCase, target: Target) -> Verdict:
    describe = case.describe()
    try:
        # Through the cluster's TLS: the cases are about the frames and the handshake inside it.
        sock = step_socket(target.step_port, target.cluster_key, timeout=ANSWER_WAIT_S)
    except OSError as exc:
        return Verdict(describe, f"cannot connect to the step socket: {exc}", "refused")
    try:
        if case.handshake:
            try:
                wire.handshake_as_head(sock, target.cluster_key, target.node_id, "fuzz",
                                       time.monotonic() + ANSWER_WAIT_S)
            except Exception as exc:  # noqa: BLE001 - any failure of a correct handshake is the finding
                return Verdict(describe, f"a correct handshake failed: {type(exc).__name__}: {exc}", "no-handshake")
        elif case.read_hello:
            kind, got = _read_answer(sock, ANSWER_WAIT_S)
            if kind != "frame" or got[0] != wire.HELLO:
                return Verdict(describe, f"no HELLO from the node ({kind})", "no-hello")
        for data, whole in zip(case.frames, case.complete, strict=True):
            try:
                sock.sendall(data)
            except OSError:
                return Verdict(describe, "", "closed")  # the node hung up on an earlier frame: allowed
            kind, got = _read_answer(sock, ANSWER_WAIT_S if whole else PARTIAL_WAIT_S)
            if kind == "frame" and got[0] == wire.HELLO and not case.handshake and not case.read_hello:
                kind, got = _read_answer(sock, ANSWER_WAIT_S if whole else PARTIAL_WAIT_S)  # sent on accept
            if kind == "silent":
                if whole:
                    return Verdict(describe, f"no answer within {ANSWER_WAIT_S}s to a whole frame", "silent")
                return Verdict(describe, "", "waiting")  # it waits for the rest of the frame: so it should
            if kind == "closed":
                return Verdict(describe, "", "closed")
            if got[0] == wire.ERROR:
                name, _, detail = got[1:].decode(errors="replace").partition("\n")
                if name not in ALLOWED_CODE_NAMES or not detail.strip():
                    return Verdict(describe, f"an error frame {name!r}: {detail}", f"error:{name}")
                after, _ = _read_answer(sock, ANSWER_WAIT_S)
                if after != "closed":
                    return Verdict(describe, "the node did not close after its error frame", f"error:{name}")
                return Verdict(describe, "", f"error:{name}")
            if got[0] == wire.PROOF and not case.handshake:
                return Verdict(describe, "the node answered a made-up proof with its own", "proof")
            if got[0] != wire.OUTPUT:
                return Verdict(describe, f"a frame of kind {got[0]}", f"kind:{got[0]}")
            try:
                pb.ForwardReply.FromString(got[1:])
            except pbm.DecodeError as exc:
                return Verdict(describe, f"an OUTPUT that is not a ForwardReply: {exc}", "output")
        return Verdict(describe, "", "output")
    finally:
        sock.close()


# ============================================================================ surface: HTTP


@dataclass(frozen=True)
class HttpCase:
    method: str
    path: str
    body: bytes
    content_type: str
    stream: bool  # the body asks for SSE (as far as it is a JSON object)
    shown: str

    def describe(self) -> str:
        return f"{self.method} {self.path} ({self.content_type}) {self.shown}"


def random_json(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.random()
    if depth > 3 or pick < 0.45:
        return rng.choice((
            None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 1.5, -0.0, 1e308, 5e-324,
            random_text(rng), _ascii(rng, rng.randrange(0, 20)), rng.randrange(-1000, 1000),
        ))
    if pick < 0.7:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    keys = ("messages", "prompt", "max_tokens", "stream", "role", "content", "model", "stop", "n", "seed",
            "temperature", "type", "text")
    return {rng.choice(keys) if rng.random() < 0.7 else random_text(rng, 12): random_json(rng, depth + 1)
            for _ in range(rng.randrange(0, 5))}


def _nested(rng: random.Random) -> str:
    depth = rng.choice((50, 500, 5000, 100_000))
    opener, closer = rng.choice((("[", "]"), ('{"a":', "}")))
    return opener * depth + "1" + closer * depth


def _valid_body(rng: random.Random, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": rng.randrange(1, 17)}
    if chat:
        body["messages"] = [{"role": rng.choice(("system", "user", "assistant", "developer")),
                             "content": rng.choice(("hi", "Tell me a story.", random_text(rng)))}
                            for _ in range(rng.randrange(1, 4))]
        body["messages"][-1]["role"] = "user"
    else:
        body["prompt"] = rng.choice(("The quick brown fox", "hi", random_text(rng)))
    for name, value in (("temperature", rng.choice((0, 0.7, 1.5))), ("stream", rng.random() < 0.4),
                        ("seed", rng.randrange(1000)), ("stop", ["\n"]), ("top_p", 0.9), ("top_k", 20),
                        ("stream_options", {"include_usage": True}), ("frequency_penalty", 0.5),
                        ("presence_penalty", -1.0), ("logit_bias", {"11": -100, "30": 5}),
                        ("logprobs", True if chat else 2)):
        if rng.random() < 0.3:
            body[name] = value
    return body


FIELDS = ("messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
          "repeat_penalty", "seed", "stop", "stream", "stream_options", "logprobs", "n", "model", "echo", "suffix",
          "frequency_penalty", "presence_penalty", "logit_bias", "top_logprobs")


def _mutate_body(rng: random.Random, body: dict[str, Any]) -> dict[str, Any]:
    body = json.loads(json.dumps(body))
    for _ in range(rng.randrange(1, 4)):
        pick = rng.random()
        name = rng.choice(FIELDS)
        if pick < 0.35:
            body[name] = random_json(rng)
        elif pick < 0.5:
            body[name] = rng.choice((-1, 0, 2**31, 2**53 + 1, 10**20, -(10**20), 1e300, 0.5, "8", [8], {"v": 8}))
        elif pick < 0.6:
            body.pop(rng.choice(list(body) or ["x"]), None)
        elif pick < 0.75 and isinstance(body.get("messages"), list) and body["messages"]:
            message = body["messages"][rng.randrange(len(body["messages"]))]
            if isinstance(message, dict):
                part = rng.choice(("role", "content", "name", "extra"))
                message[part] = rng.choice((
                    random_json(rng), random_text(rng, 400), [{"type": "text", "text": random_text(rng)}],
                    [{"type": "image_url", "image_url": "x"}], "x" * rng.choice((1000, 50_000)), None, 7,
                    rng.choice(("system", "user", "assistant", "tool", "developer", "root", "")),
                ))
        elif pick < 0.85:
            body["messages"] = [{"role": "user", "content": random_text(rng)} for _ in
                                range(rng.choice((0, 1, 50, 2000)))]
        elif pick < 0.93:
            body["stop"] = rng.choice(([random_text(rng) for _ in range(rng.randrange(0, 12))], "", [""], [1, 2]))
        else:
            body[random_text(rng, 30) or "k"] = random_json(rng)
    return body


OLLAMA_PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show")
OLLAMA_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "seed", "num_predict", "stop", "repeat_penalty",
                  "repeat_last_n", "num_ctx", "mirostat", "num_thread")


def _valid_ollama_body(rng: random.Random, path: str) -> dict[str, Any]:
    """A request of Ollama's API; a chat or generate one always bounded by num_predict."""
    body: dict[str, Any] = {"model": rng.choice(("default", "default:latest", "llama3", ""))}
    if path == "/api/chat":
        body["messages"] = [{"role": rng.choice(("system", "user", "assistant", "tool")),
                             "content": rng.choice(("hi", random_text(rng)))} for _ in range(rng.randrange(0, 3))]
    elif path == "/api/generate":
        body["prompt"] = rng.choice(("The quick brown fox", "", random_text(rng)))
        body["raw"] = rng.random() < 0.3
    elif path in ("/api/embed", "/api/embeddings"):
        body["input" if path == "/api/embed" else "prompt"] = rng.choice(("hi", ["a", "b"], random_text(rng)))
    if path in ("/api/chat", "/api/generate"):
        body["options"] = {"num_predict": rng.randrange(1, 17)}
        body["stream"] = rng.random() < 0.6
    return body


def _mutate_ollama_body(rng: random.Random, body: dict[str, Any]) -> dict[str, Any]:
    body = json.loads(json.dumps(body))
    for _ in range(rng.randrange(1, 4)):
        pick = rng.random()
        if pick < 0.4 and isinstance(body.get("options"), dict):
            body["options"][rng.choice(OLLAMA_OPTIONS[:5] + OLLAMA_OPTIONS[6:])] = rng.choice(
                (random_json(rng), -1, 0, 10**20, 1e300, "8", [8], None, 0.5))
        elif pick < 0.7:
            body[rng.choice(("model", "messages", "prompt", "input", "format", "tools", "keep_alive", "system",
                             "think", "truncate", "raw", "images", "stream"))] = random_json(rng)
        else:
            body[random_text(rng, 30) or "k"] = random_json(rng)
    return body


def make_http_case(rng: random.Random) -> HttpCase:
    pick = rng.random()
    if pick < 0.45:
        method, path = "POST", "/v1/chat/completions"
    elif pick < 0.8:
        method, path = "POST", "/v1/completions"
    elif pick < 0.9:
        method, path = "POST", rng.choice(OLLAMA_PATHS)
    else:
        method = rng.choice(("GET", "POST", "PUT"))
        path = rng.choice(("/v1/models", "/api/cluster", "/api/prometheus/targets", "/v1/embeddings", "/api/x",
                           "/v1/chat/completions"))
    content_type = "application/json" if rng.random() < 0.9 else rng.choice(
        ("text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1", ""))
    kind = rng.random()
    value: Any = None
    if kind < 0.15:
        value = random_json(rng)
        body = json.dumps(value).encode()
        shown = f"random JSON {short(body.decode(), 200)}"
    elif kind < 0.8 and path in OLLAMA_PATHS:
        value = _mutate_ollama_body(rng, _valid_ollama_body(rng, path))
        body = json.dumps(value).encode()
        shown = f"mutated {short(body.decode(), 300)}"
    elif kind < 0.8:
        value = _mutate_body(rng, _valid_body(rng, path.endswith("chat/completions")))
        body = json.dumps(value, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
        shown = f"mutated {short(body.decode('utf-8', 'replace'), 300)}"
    elif kind < 0.88:
        body = _nested(rng).encode()
        shown = f"nested JSON of {len(body)} bytes"
    elif kind < 0.96:
        body = random_bytes(rng, 2000)
        shown = f"raw {body[:64].hex()} ({len(body)} bytes)"
    else:
        raw = json.dumps(_valid_body(rng, path.endswith("chat/completions"))).encode()
        body = rng.choice((raw[: rng.randrange(len(raw))], raw + b"garbage", b"\xef\xbb\xbf" + raw,
                           raw.replace(b'"', b"'"), b'{"max_tokens": 1, "max_tokens": 2, "prompt": "a"}',
                           b'{"prompt": "\\ud800", "max_tokens": 2}', b"NaN",
                           b'{"prompt": "a", "max_tokens": Infinity}'))
        shown = f"broken JSON {short(body.decode('utf-8', 'replace'), 200)}"
    stream = isinstance(value, dict) and value.get("stream") is True
    return HttpCase(method, path, body, content_type, stream, shown)


def _json_error(response: httpx.Response, path: str = "") -> str:
    """'' when the body is an OpenAI-shaped error naming the problem (on Ollama's routes, Ollama's
    {"error": "..."}, except the API key's refusal, which is the gateway's own)."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return f"a {response.status_code} whose body is not JSON: {response.text[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if path in OLLAMA_PATHS and isinstance(error, str):
        return "" if error.strip() else f"a {response.status_code} with an empty error: {response.text[:200]!r}"
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or not error["message"].strip() \
            or not isinstance(error.get("type"), str):
        return f"a {response.status_code} without an OpenAI error body: {response.text[:200]!r}"
    return ""


def run_http_case(client: httpx.Client, url: str, case: HttpCase) -> Verdict:
    describe = case.describe()
    headers = {"content-type": case.content_type} if case.content_type else {}
    try:
        with client.stream(case.method, url + case.path, content=case.body, headers=headers,
                           timeout=httpx.Timeout(30.0)) as response:
            response.read()
    except httpx.TimeoutException:
        return Verdict(describe, "no complete answer within 30 s", "timeout")
    except httpx.HTTPError as exc:
        return Verdict(describe, f"the connection failed: {type(exc).__name__}: {exc}", "broken")
    status = str(response.status_code)
    if response.status_code >= 500:
        return Verdict(describe, f"status {status}: {response.text[:300]}", status)
    if response.status_code >= 400:
        return Verdict(describe, _json_error(response, case.path), status)
    if response.headers.get("content-type", "").startswith("application/x-ndjson"):
        try:
            lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
        except ValueError:
            return Verdict(describe, f"NDJSON with a line that is not JSON: {response.text[-200:]!r}", "ndjson")
        if not lines or not (lines[-1].get("done") is True or "error" in lines[-1]):
            return Verdict(describe, f"NDJSON that does not end done or with an error: {response.text[-200:]!r}",
                           "ndjson")
        return Verdict(describe, "", "ndjson")
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
        if not lines or lines[-1] != "data: [DONE]":
            return Verdict(describe, f"an event stream that does not end with [DONE]: {response.text[-200:]!r}",
                           "sse")
        for line in lines[:-1]:
            event = json.loads(line[6:])
            if "error" in event and int(event["error"].get("code") or 500) >= 500:
                return Verdict(describe, f"an in-stream error {event['error']}", "sse-error")
        return Verdict(describe, "", "sse")
    try:
        json.loads(response.content)
    except ValueError:
        if case.path.startswith(("/v1/", "/api/")):
            return Verdict(describe, f"a {status} that is not JSON: {response.text[:200]!r}", status)
    return Verdict(describe, "", status)


def gateway_still_serves(url: str) -> str:
    try:
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
        text = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=30)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    for got in (chat, text):
        if got.status_code != 200 or got.json()["usage"]["completion_tokens"] < 1:
            return f"a normal request got {got.status_code}: {got.text[:300]}"
    return ""


# ============================================================================ surface: GGUF headers


@dataclass(frozen=True)
class GgufFixture:
    """A pristine tiny GGUF file and the offsets of its length and count fields, where a
    mutation makes a parser believe in absurd sizes."""

    data: bytes
    header_end: int  # where the tensor data starts
    length_offsets: tuple[int, ...]  # uint64 string lengths, array counts, dims
    count_offsets: tuple[int, ...]  # the tensor and metadata counts (uint64 at 8 and 16)
    type_offsets: tuple[int, ...]  # uint32 value types, array element types, tensor types, n_dims


def gguf_fixture(path: Path) -> GgufFixture:
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    lengths: list[int] = []
    types: list[int] = []
    fields = [f for f in reader.fields.values() if not f.name.startswith("GGUF.")] + [t.field for t in reader.tensors]
    for fld in fields:
        offset = fld.offset
        for part in fld.parts:  # each part is a numpy view of consecutive header bytes
            if part.dtype.kind == "u" and part.dtype.itemsize == 8 and part.size <= 8:
                lengths.extend(offset + 8 * i for i in range(part.size))  # lengths, counts, dims, offsets
            elif part.dtype.kind == "u" and part.dtype.itemsize == 4 and part.size == 1:
                types.append(offset)  # value types, element types, n_dims, tensor types (and u32 values)
            offset += part.nbytes
    data = path.read_bytes()
    return GgufFixture(data=data, header_end=int(reader.data_offset), length_offsets=tuple(sorted(set(lengths))),
                       count_offsets=(8, 16), type_offsets=tuple(sorted(set(types))))


@dataclass(frozen=True)
class GgufCase:
    data: bytes
    shown: str

    def describe(self) -> str:
        return self.shown


ABSURD_U64 = (0, 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1)


def make_gguf_case(rng: random.Random, fixture: GgufFixture) -> GgufCase:
    buf = bytearray(fixture.data)
    done: list[str] = []
    for _ in range(rng.randrange(1, 4)):
        pick = rng.random()
        if pick < 0.5 and len(buf) < fixture.header_end:
            pick = 0.5 + pick  # cut already: the field offsets may lie past the end
        if pick < 0.25:
            offset = rng.choice(fixture.length_offsets)
            value = rng.choice(ABSURD_U64)
            struct.pack_into("<Q", buf, offset, value)
            done.append(f"u64@{offset}={value}")
        elif pick < 0.35:
            offset = rng.choice(fixture.count_offsets)
            value = rng.choice(ABSURD_U64)
            struct.pack_into("<Q", buf, offset, value)
            done.append(f"count@{offset}={value}")
        elif pick < 0.5:
            offset = rng.choice(fixture.type_offsets)
            value = rng.choice((0, 5, 8, 9, 12, 13, 31, 39, 255, 2**31, 2**32 - 1))
            struct.pack_into("<I", buf, offset, value)
            done.append(f"u32@{offset}={value}")
        elif pick < 0.7:
            for _ in range(rng.randrange(1, 9)):
                offset = rng.randrange(min(len(buf), fixture.header_end))
                buf[offset] = rng.randrange(256)
            done.append("bytes in the header")
        elif pick < 0.8:
            cut = rng.randrange(0, min(len(buf), fixture.header_end + 64))
            del buf[cut:]
            done.append(f"cut at {cut}")
        elif pick < 0.87:
            buf[0:4] = rng.choice((b"GGUG", b"\x00\x00\x00\x00", b"FUGG", b"ggml"))
            done.append(f"magic {bytes(buf[0:4])!r}")
        elif pick < 0.94:
            struct.pack_into("<I", buf, 4, rng.choice((0, 1, 2, 4, 99, 2**32 - 1)))
            done.append(f"version {struct.unpack_from('<I', buf, 4)[0]}")
        else:
            offset = rng.randrange(min(len(buf), fixture.header_end) + 1)
            buf[offset:offset] = rng.randbytes(rng.randrange(1, 64))
            done.append(f"insert at {offset}")
        if len(buf) < 24:
            break
    return GgufCase(bytes(buf), ", ".join(done))


GGUF_ALLOCATION_LIMIT = 64 * 2**20  # a 300 KB file has no business costing more than this to inspect
GGUF_CASE_LIMIT_S = 10.0  # a hang
GGUF_SLOW_S = 2.0  # reading a 300 KB header takes milliseconds; seconds mean work its claimed sizes caused


class _Hang(BaseException):
    """Not an Exception: the parsers' own `except Exception` must not turn it into a ModelError."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _Hang in this (main) thread after `seconds`; an alarm already set (pytest-timeout
    uses one) is put back with what was left of it."""
    import signal

    def hang(_signum: int, _frame: Any) -> None:
        raise _Hang

    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, hang)
    outer, _interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001))


GGUF_READERS = ("inspect", "read_gguf_header")


@contextlib.contextmanager
def allocation_tracing() -> Iterator[None]:
    """tracemalloc on for a whole run of GGUF cases: started and stopped around every case,
    its own bookkeeping grew this process by 3 KB a case (what the parsers allocate is
    measured by its peak either way)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        yield
    finally:
        if started:
            tracemalloc.stop()


def run_gguf_case(case: GgufCase, workdir: Path, index: int, readers: tuple[str, ...] = GGUF_READERS) -> Verdict:
    """GGUF readers on the mutated file: node.gguf.inspect (what a node checks its model with
    at start) and the stage engine's read_gguf_header (stage loads, FetchShard's header). Each
    must give a clean parse or ModelError, no other exception, no allocation anywhere near
    the sizes the file claims, within GGUF_SLOW_S."""
    from mesh.errors import ModelError
    from node.gguf import inspect
    from node.gguf_header import read_gguf_header

    parsers: dict[str, Callable[[Path], object]] = {"inspect": inspect, "read_gguf_header": read_gguf_header}
    path = workdir / f"case-{index}.gguf"  # a fresh name each time: inspect caches per path, size and mtime
    path.write_bytes(case.data)
    outcomes = []
    problem = ""
    try:
        for name in readers:
            parse = parsers[name]
            tracing = not tracemalloc.is_tracing()
            if tracing:
                tracemalloc.start()
            tracemalloc.reset_peak()
            started = time.monotonic()
            try:
                with _time_limit(GGUF_CASE_LIMIT_S):
                    parse(path)
                outcomes.append(f"{name}:ok")
            except ModelError:
                outcomes.append(f"{name}:ModelError")
            except _Hang:
                problem = problem or f"{name} ran past {GGUF_CASE_LIMIT_S}s"
                outcomes.append(f"{name}:hang")
            except Exception as exc:  # noqa: BLE001 - any other exception (MemoryError too) is the finding
                problem = problem or f"{name} raised {type(exc).__name__}: {short(str(exc), 200)}"
                outcomes.append(f"{name}:{type(exc).__name__}")
            finally:
                _, peak = tracemalloc.get_traced_memory()
                if tracing:
                    tracemalloc.stop()
            if peak > GGUF_ALLOCATION_LIMIT and not problem:
                problem = f"{name} allocated {peak / 2**20:.0f} MB for a {len(case.data)}-byte file"
            took = time.monotonic() - started
            if took > GGUF_SLOW_S and not problem:
                problem = f"{name} took {took:.1f} s over a {len(case.data)}-byte file"
    finally:
        path.unlink(missing_ok=True)
    return Verdict(case.describe(), problem, " ".join(outcomes))


def gguf_workdir(base: Path) -> Path:
    work = base / "gguf-cases"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


# ============================================================================ running a surface

Runner = Callable[[int, random.Random], Verdict]


def run_cases(report: SurfaceReport, indices: range | list[int], run: Runner, *,
              before: Callable[[int], None] | None = None,
              on_case: Callable[[int, Verdict, float], None] | None = None,
              until: float = math.inf) -> None:
    """Run the cases in order (each with its own seeded generator), timing each but not
    `before(index)` (restoring the node, sampling memory); stop early at time.monotonic() `until`."""
    for index in indices:
        if time.monotonic() >= until:
            report.notes.append(f"stopped after {report.cases} cases: time budget spent")
            return
        if before is not None:
            before(index)
        rng = case_rng(report.seed, report.surface, index)
        started = time.perf_counter()
        verdict = run(index, rng)
        seconds = time.perf_counter() - started
        report.add(index, verdict, seconds)
        if on_case is not None:
            on_case(index, verdict, seconds)
