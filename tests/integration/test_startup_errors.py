"""Start-up errors as a user meets them: real `python -m mesh.cli node|gateway|up` processes
given a hostile or damaged model file, a port already in use or a bad EDGEMESH_* value each
exit with code 2 and one error line, no traceback, and leave nothing behind; and a shard
whose bytes do not match the sha256 its peer sent is refused."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh.config import Limits, Timeouts
from mesh.errors import ModelError
from mesh.types import ModelHeld, ModelSha
from tests.conftest import REPO
from tests.fixtures.tiny_gguf import SPECS, write_tiny_gguf

START_S = 120.0  # generous: other tests may share the two cores


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = START_S) -> subprocess.CompletedProcess[str]:
    """Run `python -m mesh.cli ARGS` to its end (it must end: each case here is an error)."""
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def assert_one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit code 2, exactly one error line naming every fragment, and no traceback (nor
    the gRPC core's own error lines)."""
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert done.returncode == 2, f"exit code {done.returncode}:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not re.search(r"^E\d{4} ", done.stderr, re.MULTILINE), done.stderr[-3000:]
    assert len(errors) == 1, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


NODE = ("node", "--port", "0", "--metrics-port", "0", "--step-port", "0", "--threads", "1", "--no-advertise")


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port some other program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


# ---------------------------------------------------------------------------- model files

def _tiny_layout(path: Path) -> tuple[bytes, int, int]:
    """(bytes, offset of tokenizer.ggml.token_type's element count, offset of the first
    dimension of the first 2-D tensor) of a good tiny model."""
    from gguf import GGUFReader

    data = path.read_bytes()
    reader = GGUFReader(str(path))
    field = reader.fields["tokenizer.ggml.token_type"]
    (key_len,) = struct.unpack_from("<Q", data, field.offset)
    count_at = field.offset + 8 + key_len + 4 + 4
    tensor = next(t for t in reader.tensors if len(t.shape) == 2)
    (name_len,) = struct.unpack_from("<Q", data, tensor.field.offset)
    shape_at = tensor.field.offset + 8 + name_len + 4
    return data, count_at, shape_at


@pytest.mark.parametrize("case,fragment", [
    ("a 2**40-element array", "1099511627776 elements"),  # today: hours of looping, memory growing
    ("a 2**40-wide tensor", "lies past the end of the file"),
    ("cut in half", "truncated or corrupt"),
    ("wrong magic", "not the GGUF magic"),
])
def test_a_hostile_model_file_is_a_one_line_error_at_start(tmp_path: Path, case: str, fragment: str) -> None:
    good = write_tiny_gguf(tmp_path / "good.gguf", next(s for s in SPECS if s.name == "llama-q8_0"))
    data, count_at, shape_at = _tiny_layout(good)
    hostile = bytearray(data)
    if case == "a 2**40-element array":
        struct.pack_into("<Q", hostile, count_at, 2**40)
    elif case == "a 2**40-wide tensor":
        struct.pack_into("<Q", hostile, shape_at, 2**40)
    elif case == "cut in half":
        del hostile[len(hostile) // 2:]
    else:
        hostile[:4] = b"GGUX"
    path = tmp_path / "hostile.gguf"
    path.write_bytes(bytes(hostile))
    started = time.monotonic()
    done = run_cli(*NODE, "--model", str(path), timeout=60)
    assert_one_line_error(done, str(path), fragment)
    assert time.monotonic() - started < 30


def _corrupt_a_tensor(path: Path) -> None:
    """4 KiB of random bytes inside the biggest tensor, the mtime set back afterwards."""
    from node import gguf

    before = path.stat()
    tensor = max(gguf.inspect(path).tensors, key=lambda t: t.n_bytes)
    with path.open("r+b") as f:
        f.seek(tensor.data_offset + tensor.n_bytes // 2)
        f.write(random.Random(4).randbytes(4096))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_damaged_cached_default_model_is_refused_before_it_serves(tmp_path: Path, default_model: Path) -> None:
    """The issue's probe: 4 KB of random bytes inside a tensor of the default model, which
    today a node serves (garbage). The cache's copy must match the sha256 its wheel promised."""
    from mesh.catalogue import default

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    cached = home / "models" / default().file_name
    shutil.copyfile(default_model, cached)
    env = {"EDGEMESH_HOME": str(home)}
    # Hashed once while intact, as a node that ran before would have: the damage comes after.
    first = run_cli("model", "path", "default", env=env)
    assert first.returncode == 0 and first.stdout.strip() == str(cached), first.stderr[-2000:]
    _corrupt_a_tensor(cached)

    ready = tmp_path / "node.ready"
    done = run_cli(*NODE, "--model", "default", "--ready-file", str(ready), env=env)
    line = assert_one_line_error(done, str(cached), "damaged or was altered", "edgemesh model pull default")
    assert not ready.exists(), line
    assert "verifying" in done.stderr  # the hash of a big file shows progress
    # By path as `up` passes it to its nodes, and to `up` itself, which starts no node.
    assert_one_line_error(run_cli(*NODE, "--model", str(cached), env=env), "damaged or was altered")
    assert_one_line_error(run_cli("up", "--nodes", "1", "--port", "0", env=env), "damaged or was altered")


# ---------------------------------------------------------------------------- ports and environment

@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--step-port"])
def test_a_node_port_in_use_is_a_one_line_error(taken_port: int, flag: str, default_model: Path) -> None:
    args = list(NODE)
    args[args.index(flag) + 1] = str(taken_port)
    started = time.monotonic()
    done = run_cli(*args, "--model", str(default_model))
    assert_one_line_error(done, f"127.0.0.1:{taken_port}", flag, "in use")
    assert time.monotonic() - started < 30  # said before the model is hashed and probed


def test_negative_slots_are_a_one_line_error_before_the_model_is_read(default_model: Path) -> None:
    started = time.monotonic()
    done = run_cli(*NODE, "--slots", "-1", "--model", str(default_model))
    assert_one_line_error(done, "--slots must be 0 (as many as the memory budget holds) or more, not -1")
    assert time.monotonic() - started < 30  # said before the model is hashed and probed


def test_a_gateway_port_in_use_is_a_one_line_error(taken_port: int, default_model: Path) -> None:
    done = run_cli("gateway", "--port", str(taken_port), "--no-discovery", "--model", str(default_model))
    assert_one_line_error(done, f"127.0.0.1:{taken_port}", "--port")


@pytest.mark.parametrize("variable,value,expected", [
    ("EDGEMESH_SLOTS", "abc", "is not a whole number"),
    ("EDGEMESH_MAX_QUEUE", "7.5", "is not a whole number"),
    ("EDGEMESH_ADVERTISE", "maybe", "is not a boolean"),
])
def test_a_bad_environment_value_is_a_one_line_error(variable: str, value: str, expected: str) -> None:
    # No flag for the variable's setting here (a flag would win over it).
    done = run_cli("node", "--port", "0", "--metrics-port", "0", "--step-port", "0", env={variable: value},
                   timeout=60)
    assert_one_line_error(done, f"{variable}={value!r}", expected)


def test_a_bad_environment_value_breaks_only_the_commands_that_use_it(taken_port: int,
                                                                     default_model: Path) -> None:
    # `status` has no --slots: it runs (and fails for its own reason, the unreachable gateway).
    status = run_cli("status", "--url", "http://127.0.0.1:9", env={"EDGEMESH_SLOTS": "abc"})
    assert_one_line_error(status, "cannot reach the gateway")
    # A flag given outright wins over the environment: the gateway gets as far as its port.
    gateway = run_cli("gateway", "--port", str(taken_port), "--no-discovery", "--model", str(default_model),
                      env={"EDGEMESH_PORT": "abc"})
    assert "EDGEMESH_PORT" not in assert_one_line_error(gateway, f"127.0.0.1:{taken_port}")


def _processes_with(marker: str) -> list[int]:
    """Pids of the live processes whose environment holds `marker` (every child of a process
    inherits its environment, so this finds them even once they are orphans)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_up_whose_gateway_port_is_taken_leaves_nothing_behind(tmp_path: Path, taken_port: int,
                                                              default_model: Path) -> None:
    marker = f"EDGEMESH_TEST_MARKER=up-{os.getpid()}-{time.monotonic_ns()}"
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    tmp.mkdir()
    env = {"EDGEMESH_HOME": str(home), "TMPDIR": str(tmp), marker.split("=")[0]: marker.split("=")[1]}
    done = run_cli("up", "--nodes", "2", "--port", str(taken_port), "--model", str(default_model), env=env)
    try:
        assert_one_line_error(done, f"127.0.0.1:{taken_port}", "--port")
        assert "started node" not in done.stderr  # refused before any node was started
        assert _processes_with(marker) == []
        assert list(tmp.iterdir()) == []  # no edgemesh-up-* folder
        assert list(home.glob("up-*.key")) == []  # nor the mesh's key file
    finally:
        for pid in _processes_with(marker):  # a leftover node, if this failed: end it by its pid
            os.kill(pid, 9)


# ---------------------------------------------------------------------------- shards from a peer

def test_a_shard_whose_bytes_do_not_match_the_peers_sha256_is_refused(tmp_path: Path) -> None:
    """A peer (here a hostile one) announces a range's sha256 but sends other bytes: the
    range is not recorded as present, the error names the peer, and asking again fetches it."""
    import hashlib

    from mesh.transport.channels import NodeClient
    from mesh.transport.generated import edgemesh_pb2 as pb
    from mesh.transport.generated import edgemesh_pb2_grpc as pb_grpc
    from mesh.transport.server import HealthState, bind, make_server
    from mesh.transport.tls import establish_node
    from node.shards import ShardCache

    content = random.Random(7).randbytes(3 << 20)
    key = "shard-test-key"

    class LyingPeer(pb_grpc.NodeServicer):  # type: ignore[misc]
        """Sends the bytes of each range with one byte changed, closed by the true sha256."""

        async def FetchShard(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            for r in request.ranges:
                data = bytearray(content[r.offset:r.offset + r.length])
                data[len(data) // 2] ^= 0xFF
                yield pb.ShardChunk(offset=r.offset, data=bytes(data), file_bytes=len(content),
                                    range_sha256=hashlib.sha256(content[r.offset:r.offset + r.length]).hexdigest(),
                                    range_offset=r.offset, range_length=r.length)

    model = ModelHeld(name="m", sha256=ModelSha("cd" * 32), n_layers=1, file_bytes=len(content), n_ctx=64,
                      architecture="llama", n_vocab=1, shard_copy=True)

    async def scenario() -> None:
        server = make_server(key, Timeouts(), Limits(), HealthState())
        pb_grpc.add_NodeServicer_to_server(LyingPeer(), server)
        port = bind(server, "127.0.0.1", 0, establish_node(key, "0123456789abcdef"))
        await server.start()
        client = NodeClient(f"127.0.0.1:{port}", key, Timeouts(), Limits())
        try:
            cache = ShardCache(tmp_path / "shards", model)
            wanted = [(1 << 20, 1 << 20)]
            with pytest.raises(ModelError, match=f"127.0.0.1:{port} do not match their sha256"):
                await cache.fetch(client, wanted, progress=lambda *_: None)
            assert cache.missing(wanted) == wanted and cache.present_bytes() == 0
            again = ShardCache(tmp_path / "shards", model)  # nor after a restart
            assert again.missing(wanted) == wanted
        finally:
            await client.close()
            await server.stop(grace=None)

    asyncio.run(scenario())
