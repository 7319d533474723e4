"""Tokenizer text streaming against the real default model's vocabulary, mDNS record
validation, and the generated wire code being up to date with proto/."""

from __future__ import annotations

import filecmp
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from zeroconf import ServiceInfo
from zeroconf.asyncio import AsyncServiceInfo

from mesh import PROTOCOL_VERSION
from mesh.discovery import SERVICE_TYPE, peer_from_record
from mesh.tokenizer import TextStream, Tokenizer
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tokenizer(default_model: Path) -> Tokenizer:
    return Tokenizer.load(default_model)


def test_text_stream_reassembles_text_and_holds_back_partial_stop_strings(tokenizer: Tokenizer) -> None:
    text = "Hello wörld, snow ☃ and END of text"
    tokens = tokenizer.encode_completion(text)
    stream = TextStream(tokenizer, ["END"])
    emitted = []
    for t in tokens:
        emitted.append(stream.push(t))
        assert "E" not in "".join(emitted)[-1:] or stream.stopped  # 'E' of END never leaks early
    emitted.append(stream.finish())
    assert "".join(emitted) == "Hello wörld, snow ☃ and "
    assert stream.stopped

    plain = TextStream(tokenizer, [])
    assert "".join([plain.push(t) for t in tokens] + [plain.finish()]) == text


def test_chat_template_renders_from_the_gguf(tokenizer: Tokenizer, reference_llm: Any) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    ours = tokenizer.encode_chat(messages)
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    meta = reference_llm.metadata
    formatter = Jinja2ChatFormatter(template=meta["tokenizer.chat_template"],
                                    eos_token=reference_llm._model.token_get_text(reference_llm.token_eos()),
                                    bos_token=reference_llm._model.token_get_text(reference_llm.token_bos()))
    prompt = formatter(messages=messages).prompt
    assert ours == reference_llm.tokenize(prompt.encode(), add_bos=False, special=True)


def test_chat_templates_cannot_escape_the_sandbox(tokenizer: Tokenizer) -> None:
    from mesh.tokenizer import ChatTemplate

    evil = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", bos_token="", eos_token="")
    with pytest.raises(Exception, match=r"unsafe|not safely|access"):
        evil.render([{"role": "user", "content": "x"}])


def _record(props: dict[bytes, bytes], port: int = 7000) -> AsyncServiceInfo:
    info = ServiceInfo(SERVICE_TYPE, f"n.{SERVICE_TYPE}", port=port, properties=props,
                       addresses=[socket.inet_aton("127.0.0.1")])
    return AsyncServiceInfo(SERVICE_TYPE, info.name, port=info.port, properties=info.properties,
                            addresses=[socket.inet_aton("127.0.0.1")])


GOOD = {b"id": b"0123456789abcdef", b"pv": str(PROTOCOL_VERSION).encode(), b"ch": b"abcdef012345",
        b"gp": b"7000", b"mp": b"9000"}


def test_mdns_records_are_validated() -> None:
    peer = peer_from_record(_record(GOOD), "abcdef012345")
    assert peer is not None and peer.address == "127.0.0.1:7000" and peer.node_id == "0123456789abcdef"
    assert peer_from_record(_record(GOOD), "ffffffffffff") is None  # another cluster
    assert peer is not None and peer.protocol_version == PROTOCOL_VERSION
    # Another release is still a peer (membership shows it as incompatible); garbage is not.
    other = peer_from_record(_record({**GOOD, b"pv": b"999"}), "abcdef012345")
    assert other is not None and other.protocol_version == 999
    assert peer_from_record(_record({**GOOD, b"pv": b"two"}), "abcdef012345") is None
    assert peer_from_record(_record({**GOOD, b"id": b"../../etc"}), "abcdef012345") is None
    assert peer_from_record(_record({**GOOD, b"gp": b"70000"}), "abcdef012345") is None
    assert peer_from_record(_record({**GOOD, b"gp": b"7001"}), "abcdef012345") is None  # port mismatch


def test_generated_wire_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=120)
    fresh = tmp_path / "mesh" / "transport" / "generated"
    committed = REPO / "mesh" / "transport" / "generated"
    names = sorted(p.name for p in fresh.iterdir() if p.suffix in (".py", ".pyi"))
    assert names == sorted(p.name for p in committed.iterdir() if p.suffix in (".py", ".pyi"))
    _match, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, f"stale generated code {mismatch}: run scripts/gen_proto.py"
