"""Nothing of a conversation crosses the mesh in the clear (issue 17).

A packet capture (AF_PACKET on loopback, the kernel's own copy of every frame) runs while
a gateway serves a completion through a 2-stage pipeline of two `edgemesh node` processes.
Node traffic carries the prompt as token ids (GenerateRequest/RunPipelineRequest
prompt_tokens, packed varints) and hidden states, not text, so the check looks for the
prompt's token ids as protobuf packs them, besides the prompt's and the answer's text. The
same run under --insecure-plaintext is the control: there the packed ids are in the
capture, so the check can fail.

The client's own HTTP leg to the gateway (plain HTTP on loopback here) is left out of the
search by port: TLS between EdgeMesh processes is what is under test.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import Launcher, gateway_url, wait_for_pipeline

pytestmark = pytest.mark.slow

ETH_P_ALL = 0x0003
PROMPT = "The lighthouse keeper counted the violet herons again"


class LoopbackCapture:
    """Every TCP payload seen on `lo`, with its ports."""

    def __init__(self) -> None:
        self.segments: list[tuple[int, int, bytes]] = []
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self._sock.recv(1 << 16)
            except TimeoutError:
                continue
            segment = _tcp_payload(frame)
            if segment is not None:
                self.segments.append(segment)

    @contextmanager
    def running(self) -> Iterator[LoopbackCapture]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=10)
            self._sock.close()

    def payload(self, *, excluding_port: int) -> bytes:
        return b"".join(data for sport, dport, data in self.segments if excluding_port not in (sport, dport))


def _tcp_payload(frame: bytes) -> tuple[int, int, bytes] | None:
    """(source port, destination port, payload) of an IPv4 or IPv6 TCP frame, else None."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == 0x0800:
        ihl = (frame[14] & 0x0F) * 4
        if frame[23] != 6:
            return None
        tcp = 14 + ihl
    elif ethertype == 0x86DD:
        if frame[20] != 6:
            return None
        tcp = 14 + 40
    else:
        return None
    sport, dport = struct.unpack_from("!HH", frame, tcp)
    offset = (frame[tcp + 12] >> 4) * 4
    return sport, dport, frame[tcp + offset:]


def _varints(values: list[int]) -> bytes:
    out = bytearray()
    for value in values:
        while True:
            byte = value & 0x7F
            value >>= 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                break
    return bytes(out)


def _pipeline(launcher: Launcher, model: Path, *extra: str) -> tuple[str, int]:
    nodes = [launcher.node(f"stage-{i}", model, "--role", "stage", "--no-advertise", *extra) for i in (1, 2)]
    peers = [a for n in nodes for a in ("--peer", f"127.0.0.1:{n.ready[1]}")]
    gateway = launcher.gateway("gw", model, "--no-discovery", "--strategy", "pipeline", "--stages", "2", *peers,
                               *extra)
    url = gateway_url(gateway)
    wait_for_pipeline(url, 2)
    return url, int(gateway.ready[1])


def _conversation_on_the_wire(launcher: Launcher, model: Path, *extra: str) -> tuple[bytes, bytes, str, bytes]:
    """(node traffic, the client's HTTP traffic, the answer, the prompt's packed token ids)."""
    from mesh.tokenizer import Tokenizer

    packed = _varints(Tokenizer.load(model).encode_completion(PROMPT))
    url, http_port = _pipeline(launcher, model, *extra)
    with LoopbackCapture().running() as capture:
        reply = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 16, "temperature": 0},
                           timeout=120)
        assert reply.status_code == 200, reply.text
        assert len(reply.headers["x-edgemesh-route"].split(",")) == 2  # both stages served it
        time.sleep(0.5)  # the last segments reach the capture
    answer = reply.json()["choices"][0]["text"]
    everything = b"".join(data for _s, _d, data in capture.segments)
    return capture.payload(excluding_port=http_port), everything, answer, packed


@pytest.mark.skipif(os.geteuid() != 0, reason="a packet capture (AF_PACKET) needs root")
def test_a_pipeline_completion_leaves_no_text_or_token_ids_on_the_wire(launcher: Launcher,
                                                                       default_model: Path) -> None:
    wire, everything, answer, packed = _conversation_on_the_wire(launcher, default_model)
    words = [w for w in answer.split() if len(w) >= 5]
    assert PROMPT.encode() in everything  # the capture saw the client's request to the gateway
    assert len(wire) > 20_000, len(wire)  # and the nodes' traffic: hidden states of 2 stages
    assert PROMPT.encode() not in wire
    assert b"lighthouse" not in wire and b"herons" not in wire
    assert packed not in wire, "the prompt's token ids crossed the mesh readable"
    for word in words:
        assert word.encode() not in wire, word


@pytest.mark.skipif(os.geteuid() != 0, reason="a packet capture (AF_PACKET) needs root")
def test_the_control_under_insecure_plaintext_shows_the_token_ids(launcher: Launcher, default_model: Path) -> None:
    wire, _everything, _answer, packed = _conversation_on_the_wire(launcher, default_model, "--insecure-plaintext")
    assert packed in wire, "the capture cannot see what TLS would hide: the encrypted test proves nothing"
