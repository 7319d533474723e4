"""GGUF inspection: metadata, per-layer byte sizes and the file's sha256.

Reads the header with node.gguf_header (buffered reads that skip the vocabulary's arrays),
after checking it against the file's real size (`check_header`): a hostile or damaged
header must not make a reader loop for hours or allocate what it claims. Shard extraction
for shipping layers between nodes builds on `tensors_of_layers`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from mesh.errors import ModelError
from mesh.provenance import MAX_TEXT, MetaValue, Provenance, from_metadata
from node.gguf_header import SCALAR_FORMATS, ArrayLength

log = logging.getLogger(__name__)

_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.")
_HASH_CHUNK = 4 * 1024 * 1024

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # what the gguf package and llama.cpp read
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> size
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME = 64  # GGML_MAX_NAME: llama.cpp refuses a tensor name of this length or longer
_DEFAULT_ALIGNMENT = 32
# The fewest bytes one metadata entry (key length, value type, a 1-byte value) and one tensor
# entry (name length, n_dims, type, offset) can take: bounds for the counts a header claims.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8
# general.* keys kept for provenance: a file may hold any number of them, we keep this many.
_MAX_GENERAL_KEYS = 256


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
    # The general.* scalars (name, organization, license, base_model.N.*, source.*, ...), each
    # string cut to a bounded length: what the file says about where it comes from.
    general: tuple[tuple[str, MetaValue], ...] = ()

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


class _HeaderWalk:
    """Steps through a GGUF header in a read-only map of the file, checking every length and
    count against the bytes that are really there before reading or skipping them, so
    whatever a header claims costs at most one pass over the file's own bytes."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data = data
        self.size = len(data)
        self.path = path
        self.pos = 0

    def fail(self, reason: str) -> ModelError:
        return ModelError(f"{self.path} is not a usable GGUF file: {reason}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos}, but the file has "
                            f"{self.size - self.pos} left (truncated or corrupt)")

    def unpack(self, fmt: str, what: str) -> int:
        self.need(struct.calcsize(fmt), what)
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(value)

    def skip_string(self, what: str) -> None:
        n = self.unpack("<Q", what)
        self.need(n, what)
        self.pos += n

    def text(self, what: str, limit: int | None = None) -> str:
        n = self.unpack("<Q", what)
        if limit is not None and n >= limit:
            raise self.fail(f"{what} is {n} bytes long (at most {limit - 1})")
        self.need(n, what)
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at offset {self.pos - n} is not UTF-8") from None

    def value(self, vtype: int, key: str) -> Any:
        """A metadata value: a scalar as it is, a string as UTF-8 (bytes that are not are
        replaced), an array skipped and stood for by its length (an ArrayLength)."""
        if vtype in SCALAR_FORMATS:
            fmt = SCALAR_FORMATS[vtype]
            self.need(struct.calcsize(fmt), f"the value of {key}")
            (value,) = struct.unpack_from(fmt, self.data, self.pos)
            self.pos += struct.calcsize(fmt)
            return value
        if vtype == _STRING:
            n = self.unpack("<Q", f"the value of {key}")
            self.need(n, f"the value of {key}")
            raw = bytes(self.data[self.pos:self.pos + n])
            self.pos += n
            return raw.decode("utf-8", errors="replace")
        start = self.pos
        self.skip_value(vtype, key)  # refuses what is neither a scalar, a string nor an array
        (count,) = struct.unpack_from("<Q", self.data, start + 4)  # after the element type
        return ArrayLength(count)

    def skip_value(self, vtype: int, key: str) -> None:
        if vtype in _SCALAR_BYTES:
            self.need(_SCALAR_BYTES[vtype], f"the value of {key}")
            self.pos += _SCALAR_BYTES[vtype]
        elif vtype == _STRING:
            self.skip_string(f"the value of {key}")
        elif vtype == _ARRAY:
            etype = self.unpack("<I", f"the element type of {key}")
            count = self.unpack("<Q", f"the length of {key}")
            if etype in _SCALAR_BYTES:
                self.need(count * _SCALAR_BYTES[etype], f"{key} ({count} elements)")
                self.pos += count * _SCALAR_BYTES[etype]
            elif etype == _STRING:
                self.need(count * 8, f"{key} ({count} strings)")  # each string has at least its length
                for _ in range(count):
                    self.skip_string(f"an element of {key}")
            else:  # llama.cpp reads no arrays of arrays either
                raise self.fail(f"{key} is an array of type {etype}")
        else:
            raise self.fail(f"{key} has unknown value type {vtype}")


@dataclass(frozen=True)
class CheckedHeader:
    """What check_header read on its way: the metadata (arrays by their length), and each
    tensor as (name, ggml type, shape, bytes, absolute offset of its data)."""

    metadata: dict[str, Any]
    tensors: tuple[tuple[str, int, tuple[int, ...], int, int], ...]


def check_header(path: Path) -> CheckedHeader:
    """Check a GGUF header against the file it is in: magic, version, that every count,
    length and tensor (type, shape, offset and size) fits in the file's real bytes, and
    return what it says. Raises ModelError naming what is wrong; allocates nothing of the
    sizes the header claims."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # heavy import, only when a file is checked

    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ModelError(f"{path} is not a usable GGUF file: it has only {size} bytes")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from exc
    with data:
        w = _HeaderWalk(data, path)
        if data[:4] != _MAGIC:
            raise w.fail(f"it starts with {bytes(data[:4])!r}, not the GGUF magic")
        w.pos = 4
        version = w.unpack("<I", "the version")
        if version not in _VERSIONS:
            order = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise w.fail(f"GGUF version {version}{order} is not supported")
        n_tensors = w.unpack("<Q", "the tensor count")
        n_kv = w.unpack("<Q", "the metadata count")
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > size - w.pos:
            raise w.fail(f"it claims {n_tensors} tensors and {n_kv} metadata entries, more than "
                         f"{size} bytes can hold")
        alignment = _DEFAULT_ALIGNMENT
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = w.text("a metadata key")
            if key in metadata:
                raise w.fail(f"metadata key {key} appears twice")
            vtype = w.unpack("<I", f"the type of {key}")
            if key == "general.alignment":
                if vtype != _UINT32:
                    raise w.fail(f"general.alignment has type {vtype}, not uint32")
                alignment = w.unpack("<I", "general.alignment")
                if alignment == 0 or alignment & (alignment - 1):
                    raise w.fail(f"general.alignment {alignment} is not a power of two")
                metadata[key] = alignment
                continue
            metadata[key] = w.value(vtype, key)
        entries: list[tuple[str, int, tuple[int, ...], int, int]] = []  # name, type, shape, bytes, offset in the data
        names: set[str] = set()
        for _ in range(n_tensors):
            name = w.text("a tensor name", limit=_MAX_NAME)
            if name in names:
                raise w.fail(f"tensor {name} appears twice")
            names.add(name)
            n_dims = w.unpack("<I", f"the dimension count of {name}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise w.fail(f"tensor {name} has {n_dims} dimensions (1 to {_MAX_DIMS})")
            shape = [w.unpack("<Q", f"the shape of {name}") for _ in range(n_dims)]
            ggml_type = w.unpack("<I", f"the type of {name}")
            offset = w.unpack("<Q", f"the offset of {name}")
            try:
                block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise w.fail(f"tensor {name} has unknown type {ggml_type}") from None
            if shape[0] % block:
                raise w.fail(f"tensor {name} has shape {shape}, whose rows are not whole blocks of {block}")
            elements = 1
            for d in shape:  # Python integers: an absurd shape cannot overflow, it is just too big
                elements *= d
            entries.append((name, ggml_type, tuple(shape), elements // block * type_bytes, offset))
        data_start = -(-w.pos // alignment) * alignment
        for name, _type, _shape, n_bytes, offset in entries:
            if offset % alignment:
                raise w.fail(f"tensor {name} starts at {offset}, not a multiple of the alignment {alignment}")
            if data_start + offset + n_bytes > size:
                raise w.fail(f"tensor {name} ({n_bytes} bytes at {data_start + offset}) lies past the end "
                             f"of the file ({size} bytes): truncated or corrupt")
    return CheckedHeader(metadata, tuple((name, ggml_type, shape, n_bytes, data_start + offset)
                                         for name, ggml_type, shape, n_bytes, offset in entries))


CHAT_TEMPLATE_KEY = "tokenizer.chat_template"  # and "tokenizer.chat_template.<name>": llama.cpp reads both


def chat_templates(path: Path, max_bytes: int) -> dict[str, str]:
    """The chat templates in a GGUF header, by key, read without llama.cpp (which compiles
    every one when it loads the model, see mesh.template_check). A template over `max_bytes`
    is refused before it is decoded; one that is not a string too: llama.cpp would turn an
    array into text and compile that."""
    from mesh.errors import UnsafeChatTemplate

    try:
        with path.open("rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise ModelError(f"cannot read model file {path}: {exc}") from exc
    found: dict[str, str] = {}
    with data:
        w = _HeaderWalk(data, path)
        if data[:4] != _MAGIC:
            raise w.fail(f"it starts with {bytes(data[:4])!r}, not the GGUF magic")
        w.pos = 8  # the magic and the version (the model's loader checks the version)
        w.unpack("<Q", "the tensor count")
        for _ in range(w.unpack("<Q", "the metadata count")):
            key = w.text("a metadata key")
            vtype = w.unpack("<I", f"the type of {key}")
            if key != CHAT_TEMPLATE_KEY and not key.startswith(CHAT_TEMPLATE_KEY + "."):
                w.skip_value(vtype, key)
                continue
            if vtype != _STRING:
                raise UnsafeChatTemplate(f"{path.name}: {key} is refused: it has GGUF value type {vtype}, "
                                         "not a string")
            n = struct.unpack_from("<Q", data, w.pos)[0] if w.size - w.pos >= 8 else 0  # short: w.text says so
            if n > max_bytes:
                raise UnsafeChatTemplate(f"{path.name}: {key} is refused: it is {n} bytes long, more than "
                                         f"{max_bytes} (EDGEMESH_TEMPLATE_MAX_SOURCE_BYTES); real chat "
                                         "templates are a few KB")
            found[key] = w.text(key)
    return found


@lru_cache(maxsize=16)
def _inspect_cached(path: str, size: int, mtime_ns: int, inode: int, ctime_ns: int) -> GgufSummary:
    # The gguf package's types table names the ggml types; its GGUFReader is not used: it builds
    # numpy objects for every element of the vocabulary and merges arrays, 6 s for SmolLM2's
    # 49k tokens here, paid by every node and gateway start. check_header's one walk skips
    # those arrays and has read the rest by the time it has checked it (0.2 s).
    from gguf import GGMLQuantizationType  # heavy import, only when a file is inspected

    header = check_header(Path(path))
    meta, entries = header.metadata, header.tensors

    def count(key: str) -> int:
        value = meta.get(key, 0)
        if not isinstance(value, int) or isinstance(value, (bool, ArrayLength)) or value < 0:
            raise ModelError(f"{path} is not a usable GGUF file: {key} is {str(value)[:40]!r}, not a count")
        return value

    arch = meta.get("general.architecture", "")
    if not arch or not isinstance(arch, str):
        raise ModelError(f"{path} has no general.architecture")
    if "\ufffd" in arch or not arch.isprintable():  # the reader replaces bytes that are not UTF-8
        raise ModelError(f"{path} is not a usable GGUF file: general.architecture {arch[:40]!r} is not text")
    n_layers = count(f"{arch}.block_count")
    if n_layers > len(entries):  # every layer has tensors of its own
        raise ModelError(f"{path} is not a usable GGUF file: it claims {n_layers} layers but has "
                         f"{len(entries)} tensors")
    tokens = meta.get("tokenizer.ggml.tokens", 0)
    tensors = tuple(TensorEntry(name=name, ggml_type=GGMLQuantizationType(ggml_type).name, shape=shape,
                                n_bytes=n_bytes, data_offset=offset)
                    for name, ggml_type, shape, n_bytes, offset in entries)
    general_name = meta.get("general.name")
    return GgufSummary(
        general=_general_metadata(meta),
        path=Path(path),
        name=general_name if isinstance(general_name, str) else Path(path).stem,
        architecture=arch,
        n_layers=n_layers,
        n_ctx_train=count(f"{arch}.context_length"),
        n_embd=count(f"{arch}.embedding_length"),
        n_vocab=int(tokens) if isinstance(tokens, int) else 0,
        file_bytes=size,
        tensors=tensors,
    )


def _general_metadata(meta: dict[str, Any]) -> tuple[tuple[str, MetaValue], ...]:
    """The general.* scalar values of a file (arrays such as general.tags are left out):
    provenance is shown, never relied on."""
    found: list[tuple[str, MetaValue]] = []
    for key, value in meta.items():
        if not key.startswith("general.") or len(found) >= _MAX_GENERAL_KEYS or len(key) > MAX_TEXT:
            continue
        if isinstance(value, str):
            found.append((key, value[:MAX_TEXT * 2]))
        elif isinstance(value, (int, float)) and not isinstance(value, (bool, ArrayLength)):
            found.append((key, value))
    return tuple(found)


def provenance(path: Path, sha256: str) -> Provenance:
    """What the file says about its origin (general.* metadata), with its sha256."""
    return from_metadata(dict(inspect(path).general), sha256)


def inspect(path: Path) -> GgufSummary:
    """Read a GGUF file's header, checked against the file first (see check_header). Cached
    per path and identity of the file's content (size, mtime, inode, ctime)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from exc
    return _inspect_cached(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def _content_key(st: os.stat_result) -> dict[str, int]:
    """What changes whenever a file's bytes may have: size and mtime, which anyone who can
    write the file can set back (`touch -d`, os.utime), and the device, inode and ctime,
    which no one can: every write, utime or replacement moves ctime or the inode on."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "device": st.st_dev, "inode": st.st_ino,
            "ctime_ns": st.st_ctime_ns}


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _remember(path: Path, key: dict[str, int], value: str) -> None:
    sidecar = _sidecar(path)
    try:
        tmp = sidecar.with_name(f"{sidecar.name}.{os.getpid()}.tmp")  # per process: nodes hash at once
        tmp.write_text(json.dumps({**key, "sha256": value}))
        os.replace(tmp, sidecar)
    except OSError as exc:  # a read-only model directory is fine; we just hash again next time
        log.debug("could not cache sha256 next to %s: %s", path, exc)


def remember_sha256(path: Path, value: str) -> None:
    """Record the sha256 of a file whose bytes the caller hashed as it wrote them (a pull),
    so the first start does not read it all again."""
    _remember(path, _content_key(path.stat()), value)


def forget_sha256(path: Path) -> None:
    """Drop the remembered sha256 of a file that is going away."""
    _sidecar(path).unlink(missing_ok=True)


def file_sha256(path: Path, progress: Callable[[int, int], None] | None = None) -> str:
    """sha256 of a file, remembered in a sidecar `<file>.sha256.json` keyed by the file's
    size, mtime, device, inode and ctime, so that a restart does not re-read gigabytes
    while any change to the bytes (even one whose mtime was set back) is hashed anew."""
    try:
        st = path.stat()
        key = _content_key(st)
        try:
            cached = json.loads(_sidecar(path).read_text())
            if isinstance(cached, dict) and all(cached.get(k) == v for k, v in key.items()) \
                    and isinstance(cached.get("sha256"), str):
                return str(cached["sha256"])
        except (OSError, ValueError):
            pass
        digest = hashlib.sha256()
        done = 0
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, st.st_size)
        after = _content_key(path.stat())
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from exc
    value = digest.hexdigest()
    if after == key:  # not written to while it was read: the hash is of what the key describes
        _remember(path, key, value)
    return value
