"""Build llama.cpp's RPC server and llama-bench from the llama.cpp that llama-cpp-python vendors.

The source is the llama-cpp-python sdist of the version installed here, fetched with pip's own
client (`pip download --no-binary :all: --no-deps`), so its index, proxy and cache settings
apply and no hub or git is contacted. Its `vendor/llama.cpp` is the same llama.cpp that
EdgeMesh's engines run on, which keeps the comparison about the distribution, not the kernels.

The binaries land in ~/.cache/edgemesh/llama-rpc/<version>/bin; later runs find them there and
skip the build (minutes on 2 cores). They are linked statically (no shared ggml to find at run
time) and built for this CPU (GGML_NATIVE, as a from-source llama-cpp-python is), so the cache
belongs to this machine.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import EdgeMeshError

PACKAGE = "llama-cpp-python"
# The RPC server's target is ggml-rpc-server in the llama.cpp that llama-cpp-python 0.3.x vendors
# (older llama.cpp called it rpc-server); both names are looked for.
RPC_TARGETS = ("ggml-rpc-server", "rpc-server")
BENCH_TARGET = "llama-bench"
BUILD_JOBS = 2
CONFIGURE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_RPC=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",  # nothing here downloads models
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries in the cache
    "-DGGML_RPC_RDMA=OFF",
    "-DGGML_CUDA=OFF", "-DGGML_VULKAN=OFF", "-DGGML_METAL=OFF", "-DGGML_HIP=OFF", "-DGGML_SYCL=OFF",
    "-DGGML_OPENCL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
)

Progress = Callable[[str], None]


class LlamaBuildError(EdgeMeshError):
    """llama.cpp's binaries could not be fetched or built."""


@dataclass(frozen=True)
class Binaries:
    rpc_server: Path
    llama_bench: Path
    version: str  # of llama-cpp-python, whose vendored llama.cpp they were built from


def installed_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise LlamaBuildError(f"{PACKAGE} is not installed in this Python ({sys.executable})") from None


def cache_root(version: str) -> Path:
    return Path(os.path.expanduser("~/.cache/edgemesh/llama-rpc")) / version


def bin_dir(version: str) -> Path:
    return cache_root(version) / "bin"


def cached(version: str | None = None) -> Binaries | None:
    """The built binaries for `version` (the installed llama-cpp-python's by default), or None."""
    version = version or installed_version()
    directory = bin_dir(version)
    bench = directory / BENCH_TARGET
    for name in RPC_TARGETS:
        rpc = directory / name
        if rpc.is_file() and os.access(rpc, os.X_OK) and bench.is_file() and os.access(bench, os.X_OK):
            return Binaries(rpc, bench, version)
    return None


def _print(line: str) -> None:
    print(line, flush=True)


def ensure_built(version: str | None = None, progress: Progress = _print, *, rebuild: bool = False) -> Binaries:
    """The cached binaries, building them first when they are not there (or when `rebuild`)."""
    version = version or installed_version()
    found = None if rebuild else cached(version)
    if found is not None:
        return found
    root = cache_root(version)
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        found = None if rebuild else cached(version)  # another process built it while we waited
        if found is not None:
            return found
        return _build(version, root, progress)


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    import fcntl

    with open(root / ".build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build(version: str, root: Path, progress: Progress) -> Binaries:
    started = time.monotonic()
    # The work tree goes next to the cache, not to /tmp (often a small RAM disk): the build
    # directory alone is a few hundred MB. It is removed afterwards; only bin/ stays.
    with tempfile.TemporaryDirectory(prefix="build-", dir=root) as work_s:
        work = Path(work_s)
        source = _fetch_source(version, work, progress)
        build_dir = work / "build"
        configure = ["cmake", "-S", str(source), "-B", str(build_dir), *CONFIGURE_FLAGS]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        progress(f"configuring: {' '.join(configure)}")
        _run_streamed(configure, progress, every=None)
        rpc_target = _rpc_target(source)
        build = ["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(BUILD_JOBS),
                 "--target", rpc_target, BENCH_TARGET]
        progress(f"building (a few minutes on {BUILD_JOBS} cores): {' '.join(build)}")
        _run_streamed(build, progress, every=15.0)
        staged = root / "bin.partial"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        for name in (rpc_target, BENCH_TARGET):
            built = build_dir / "bin" / name
            if not built.is_file():
                raise LlamaBuildError(f"the build finished but {built} is not there")
            shutil.copy2(built, staged / name)
        final = bin_dir(version)
        shutil.rmtree(final, ignore_errors=True)
        staged.rename(final)  # bin/ appears whole or not at all
    progress(f"built {rpc_target} and {BENCH_TARGET} into {final} in {time.monotonic() - started:.0f} s")
    found = cached(version)
    if found is None:
        raise LlamaBuildError(f"built binaries are missing from {final}")
    return found


def _fetch_source(version: str, work: Path, progress: Progress) -> Path:
    progress(f"fetching the {PACKAGE}=={version} sdist with pip")
    argv = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--no-build-isolation",
            f"{PACKAGE}=={version}", "-d", str(work)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    sdists = sorted(work.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        # --no-build-isolation needs scikit-build-core installed; without it let pip isolate the
        # metadata step (it then fetches the build backend from the same index).
        argv.remove("--no-build-isolation")
        result = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        sdists = sorted(work.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        raise LlamaBuildError(f"pip could not download the {PACKAGE}=={version} sdist: "
                              f"{(result.stderr or result.stdout).strip()[-2000:]}")
    progress(f"unpacking vendor/llama.cpp from {sdists[0].name}")
    prefix = None
    with tarfile.open(sdists[0]) as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) > 2 and parts[1:3] == ["vendor", "llama.cpp"]:
                prefix = "/".join(parts[:3])
                members.append(member)
        if prefix is None:
            raise LlamaBuildError(f"{sdists[0].name} has no vendor/llama.cpp")
        tar.extractall(work, members=members, filter="data")
    sdists[0].unlink()
    return work / prefix


def _rpc_target(source: Path) -> str:
    text = (source / "tools" / "rpc" / "CMakeLists.txt").read_text() if (source / "tools" / "rpc").is_dir() else ""
    match = re.search(r"set\(TARGET\s+([\w-]+)\)", text)
    return match.group(1) if match else RPC_TARGETS[-1]


_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")
_MAKE_STEP = re.compile(r"^\[\s*(\d+)%\]")


def _run_streamed(argv: list[str], progress: Progress, every: float | None) -> None:
    """Run a build step, passing on a progress line at most every `every` seconds (every line
    when None), and the tail of its output when it fails."""
    tail: collections.deque[str] = collections.deque(maxlen=40)
    last = 0.0
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL) as process:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip()
            tail.append(line)
            now = time.monotonic()
            if every is None:
                if line.startswith("-- ") and ("RPC" in line or "CPU" in line or "Build" in line):
                    progress(f"  {line}")
                continue
            step = _NINJA_STEP.match(line) or _MAKE_STEP.match(line)
            if step and now - last >= every:
                last = now
                done = f"{step.group(1)}/{step.group(2)}" if step.re is _NINJA_STEP else f"{step.group(1)}%"
                progress(f"  [{done}] {line[step.end():].strip()[:100]}")
        code = process.wait()
    if code != 0:
        raise LlamaBuildError(f"`{' '.join(argv[:3])} ...` failed ({code}):\n" + "\n".join(tail))
