"""GGUF inspection: metadata, per-layer byte sizes and the file's sha256.

Reads the header with the `gguf` package (memory-mapped, so only touched pages are
read). Shard extraction for shipping layers between nodes builds on `tensors_of_layers`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from mesh.errors import ModelError

log = logging.getLogger(__name__)

_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.")
_HASH_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    ggml_type: str  # e.g. "Q4_1", "F32"
    shape: tuple[int, ...]  # as GGUF stores it (fastest-varying dimension first)
    n_bytes: int
    data_offset: int  # absolute offset of the tensor's bytes in the file


@dataclass(frozen=True)
class GgufSummary:
    path: Path
    name: str
    architecture: str
    n_layers: int
    n_ctx_train: int
    n_embd: int
    n_vocab: int
    file_bytes: int
    tensors: tuple[TensorEntry, ...]

    def layer_bytes(self, layer: int) -> int:
        return sum(t.n_bytes for t in self.tensors_of_layers(layer, layer + 1))

    def tensors_of_layers(self, first: int, last_exclusive: int) -> tuple[TensorEntry, ...]:
        picked = []
        for t in self.tensors:
            m = _LAYER_TENSOR.match(t.name)
            if m and first <= int(m.group(1)) < last_exclusive:
                picked.append(t)
        return tuple(picked)

    def tensor(self, name: str) -> TensorEntry | None:
        for t in self.tensors:
            if t.name == name:
                return t
        return None


def _field_value(field: Any) -> Any:
    value = field.contents()
    return value


@lru_cache(maxsize=16)
def _inspect_cached(path: str, size: int, mtime_ns: int) -> GgufSummary:
    from gguf import GGUFReader  # heavy import, only when a file is inspected

    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # the gguf package raises bare ValueError/struct errors on bad files
        raise ModelError(f"{path} is not a readable GGUF file: {exc}") from exc

    def meta(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else _field_value(field)

    arch = str(meta("general.architecture", ""))
    if not arch:
        raise ModelError(f"{path} has no general.architecture")
    n_layers = int(meta(f"{arch}.block_count", 0))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens.data) if tokens is not None else 0
    tensors = tuple(
        TensorEntry(
            name=t.name,
            ggml_type=t.tensor_type.name,
            shape=tuple(int(d) for d in t.shape),
            n_bytes=int(t.n_bytes),
            data_offset=int(t.data_offset),
        )
        for t in reader.tensors
    )
    return GgufSummary(
        path=Path(path),
        name=str(meta("general.name", Path(path).stem)),
        architecture=arch,
        n_layers=n_layers,
        n_ctx_train=int(meta(f"{arch}.context_length", 0)),
        n_embd=int(meta(f"{arch}.embedding_length", 0)),
        n_vocab=n_vocab,
        file_bytes=size,
        tensors=tensors,
    )


def inspect(path: Path) -> GgufSummary:
    """Read a GGUF file's header. Cached per (path, size, mtime)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from exc
    return _inspect_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


def file_sha256(path: Path, progress: Callable[[int, int], None] | None = None) -> str:
    """sha256 of a file, remembered in a sidecar `<file>.sha256.json` keyed by size and mtime
    so that a restart does not re-read gigabytes."""
    st = path.stat()
    sidecar = path.with_name(path.name + ".sha256.json")
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        cached = json.loads(sidecar.read_text())
        if cached.get("size") == key["size"] and cached.get("mtime_ns") == key["mtime_ns"]:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, st.st_size)
    value = digest.hexdigest()
    try:
        tmp = sidecar.with_suffix(".tmp")
        tmp.write_text(json.dumps({**key, "sha256": value}))
        os.replace(tmp, sidecar)
    except OSError as exc:  # a read-only model directory is fine; we just hash again next time
        log.debug("could not cache sha256 next to %s: %s", path, exc)
    return value
