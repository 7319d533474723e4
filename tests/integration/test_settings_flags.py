"""Timeouts given as flags or EDGEMESH_<FIELD> variables take effect in real processes.

The unit tests (tests/unit/test_auth_and_config.py) check that every flag and variable
reaches the config object; these check that the processes act on what they received: a
shortened timeout closes a connection in about that time, not in the default's.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from mesh.config import Timeouts
from tests.conftest import Launcher, gateway_url
from tests.fixtures.tiny_gguf import SPECS, write_tiny_gguf

pytestmark = pytest.mark.slow

SHORT_S = 1.0  # every default shortened here is at least 5 s


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", SPECS[0])


def _answer_within(address: tuple[str, int], send: bytes, limit_s: float) -> tuple[bytes, float]:
    """Send `send`, then read until the server closes the connection; (what it said, when)."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(send)
        started = time.monotonic()
        sock.settimeout(0.2)
        answer = b""
        while time.monotonic() - started < limit_s:
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
        return answer, time.monotonic() - started


def test_a_gateway_takes_a_timeout_from_a_flag_and_another_from_the_environment(launcher: Launcher,
                                                                               tiny_model: Path) -> None:
    assert Timeouts().http_body_s > 5 * SHORT_S and Timeouts().http_header_s > 5 * SHORT_S
    proc = launcher.start("gateway", ["gateway", "--model", str(tiny_model), "--port", "0", "--no-discovery",
                                      "--http-body-s", str(SHORT_S)],
                          env={"EDGEMESH_HTTP_HEADER_S": str(SHORT_S)})
    host, port = gateway_url(proc).removeprefix("http://").rsplit(":", 1)
    address = (host, int(port))
    # --http-body-s: a body that never arrives is answered 408 after it, not after a minute.
    answer, took = _answer_within(address, b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\n"
                                           b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{", 15)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert SHORT_S * 0.9 <= took < SHORT_S + 3, took
    # EDGEMESH_HTTP_HEADER_S: a connection that never finishes its headers is closed after it.
    answer, took = _answer_within(address, b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n", 15)
    assert SHORT_S * 0.9 <= took < SHORT_S + 3, (took, answer[:200])


def test_a_node_takes_a_timeout_from_the_environment(launcher: Launcher, tiny_model: Path) -> None:
    """A node's metrics server cuts a connection not done within Timeouts.connect_s (default 5 s).
    (That a flag wins over the variable is the same code for every command: the unit tests.)"""
    assert Timeouts().connect_s >= 5 * SHORT_S
    proc = launcher.start("node", ["node", "--model", str(tiny_model), "--name", "node", "--port", "0",
                                   "--metrics-port", "0", "--step-port", "0", "--threads", "1",
                                   "--no-advertise"], env={"EDGEMESH_CONNECT_S": str(SHORT_S)})
    _, took = _answer_within(("127.0.0.1", int(proc.ready[2])), b"GET /metrics HTTP/1.1\r\n", 15)
    assert SHORT_S * 0.9 <= took < SHORT_S + 2.5, took
