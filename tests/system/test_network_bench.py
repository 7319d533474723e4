"""benchmarks/network.py, the pipeline benchmark over emulated links, runs end to end and cleans up.

`python -m benchmarks.network --quick --profiles ethernet --shapes 3` as a user types it: a
3-stage mesh of real node processes on a shaped TestNet, llama.cpp in the benchmark's own
process, and llama.cpp's RPC mode on a network of its own when its binaries are built. The
table must carry every column the issue asks for, and nothing the run started (process,
namespace) may outlive it. Every process the benchmark starts inherits a marker variable,
so a survivor is found by its environment even after it was re-parented.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.harness import processes
from tests.system.netns import unavailable_link_reason

_UNAVAILABLE = unavailable_link_reason()
if _UNAVAILABLE:
    pytest.skip(_UNAVAILABLE, allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.netns]

MARKER = "EDGEMESH_NETBENCH_TEST"
RUN_TIMEOUT_S = 600.0


def _marked(token: str) -> list[int]:
    """Processes whose environment carries MARKER=token (the benchmark's descendants)."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for row in processes.proc_table():
        if row.state == "Z":
            continue
        try:
            environ = Path(f"/proc/{row.pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(row.pid)
    return found


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _leftovers(stderr: str, token: str) -> tuple[list[int], list[str]]:
    tags = re.findall(r"network em-([0-9a-f]{6})", stderr)
    left_ns = sorted(ns for ns in _namespaces() if any(ns.startswith(f"em-{t}-") for t in tags))
    return _marked(token), left_ns


def _env(token: str) -> dict[str, str]:
    return {**os.environ, MARKER: token}


def test_quick_run_prints_the_table_and_leaves_nothing_behind(default_model: Path) -> None:
    token = secrets.token_hex(8)
    started = time.monotonic()
    result = processes.run([sys.executable, "-m", "benchmarks.network", "--quick", "--profiles", "ethernet",
                            "--shapes", "3", "--model", str(default_model)],
                           timeout=RUN_TIMEOUT_S, capture_output=True, text=True, cwd=REPO, env=_env(token))
    took = time.monotonic() - started
    print(f"benchmarks.network --quick took {took:.0f} s\n{result.stdout}")
    assert result.returncode == 0, result.stderr[-4000:]
    # progress as it went
    assert "cell 1 of 1: ethernet, 3 stages" in result.stderr
    assert "run 1 of 1" in result.stderr
    out = result.stdout
    for section in ("decode", "time to first token, 512-token prompt", "bytes per generated token"):
        assert re.search(rf"^{re.escape(section)}", out, re.M), out
    for column in ("tok/s", "ms/token", "1-proc tok/s", "speed x1-proc", "floor ms", "time x floor",
                   "RPC tok/s", "speed xRPC", "time x1-proc", "time xRPC", "hidden states", "x floor"):
        assert column in out, (column, out)
    rows = re.findall(r"^  ethernet\s+3 stages\s+(.*)$", out, re.M)
    assert len(rows) == 3, out  # one row per table
    decode = rows[0].split()
    tok_s, ms_token = float(decode[0]), float(decode[1])
    assert tok_s > 0 and abs(ms_token - 1000 / tok_s) < 0.05 * ms_token
    # three stages of f32 hidden states: two hops of n_embd floats a token, and nothing more
    hidden = rows[2].split()
    assert float(hidden[0]) == float(hidden[1]) > 0, rows[2]
    assert "llama.cpp RPC" in out
    pids, namespaces = _leftovers(result.stderr, token)
    assert pids == [] and namespaces == [], (pids, namespaces)


def test_ctrl_c_mid_run_ends_everything(default_model: Path, tmp_path: Path) -> None:
    """SIGINT while a run streams: the benchmark ends its mesh, removes its network and exits."""
    token = secrets.token_hex(8)
    err_path = tmp_path / "stderr"
    with open(err_path, "wb") as err:
        bench = processes.popen([sys.executable, "-m", "benchmarks.network", "--quick", "--no-rpc",
                                 "--profiles", "ethernet", "--shapes", "2", "--model", str(default_model)],
                                stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO,
                                env=_env(token))
    try:
        deadline = time.monotonic() + 240
        while "run 1 of 1: decode" not in err_path.read_text(errors="replace"):
            assert bench.poll() is None, err_path.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, err_path.read_text(errors="replace")[-4000:]
            time.sleep(0.1)
        assert set(_marked(token)) - {bench.pid}, "the mesh's processes should be running now"
        os.kill(bench.pid, signal.SIGINT)
        code = bench.wait(timeout=120)
    finally:
        processes.stop_group(bench, grace_s=120)
    stderr = err_path.read_text(errors="replace")
    assert code == 130, stderr[-4000:]
    assert "interrupted" in stderr
    pids, namespaces = _leftovers(stderr, token)
    assert pids == [] and namespaces == [], (pids, namespaces)
