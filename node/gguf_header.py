"""A minimal GGUF header reader: metadata scalars and the tensor directory, nothing else.

The gguf package's GGUFReader materialises every metadata array as numpy objects; for a
49k-token vocabulary that takes seconds, which a stage (re)load during failover should
not pay. This reader skips arrays it does not need (it only counts the vocabulary) and
reads the header with a handful of buffered reads.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from mesh.errors import ModelError

_MAGIC = b"GGUF"
SCALAR_FORMATS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


class ArrayLength(int):
    """An array the reader skipped, standing for its length (a vocabulary's token count): still
    an int where a count is wanted, and told apart from a scalar where one is not."""


class _Reader:
    """Every length the header claims is checked against what is left of the file before it is
    read or skipped: a hostile header must not make us allocate (or loop over) its claim."""

    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f = f
        self.path = path
        self.size = size

    def left(self) -> int:
        return self.size - self.f.tell()

    def _fits(self, n: int) -> None:
        if n < 0 or n > self.left():
            raise ModelError(f"{self.path} ends inside its GGUF header (a length of {n} bytes runs past the end)")

    def take(self, n: int) -> bytes:
        self._fits(n)
        data = self.f.read(n)
        if len(data) != n:
            raise ModelError(f"{self.path} ends inside its GGUF header")
        return data

    def skip(self, n: int) -> None:
        self._fits(n)
        self.f.seek(n, 1)

    def count(self, min_entry_bytes: int) -> int:
        """A count of entries, each at least `min_entry_bytes` long, that the file can hold."""
        n = int(self.unpack("<Q"))
        self._fits(n * min_entry_bytes)
        return n

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.skip(self.unpack("<Q"))

    def value(self, vtype: int, keep_array: bool) -> Any:
        if vtype in SCALAR_FORMATS:
            return self.unpack(SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.unpack("<I")
            if etype in SCALAR_FORMATS:
                size = struct.calcsize(SCALAR_FORMATS[etype])
                count = self.count(size)
                if keep_array:
                    return list(struct.unpack(f"<{count}{SCALAR_FORMATS[etype][1]}", self.take(size * count)))
                self.skip(size * count)
                return ArrayLength(count)
            if etype == _STRING:
                count = self.count(8)  # each string has at least its 8-byte length
                for _ in range(count):
                    self.skip_string()
                return ArrayLength(count)  # string arrays (vocabularies, merges) are reported by length only
            raise ModelError(f"{self.path}: nested GGUF arrays are not supported")
        raise ModelError(f"{self.path}: unknown GGUF value type {vtype}")


def read_gguf_header(path: Path) -> tuple[dict[str, Any], list[tuple[str, int, tuple[int, ...], int]], int]:
    """(metadata, tensors as (name, ggml type, ggml shape, offset relative to data start), data start).
    String arrays in the metadata (and numeric ones under tokenizer.*) are replaced by their length,
    an ArrayLength; other numeric arrays are kept as lists."""
    try:
        f = path.open("rb", buffering=1 << 20)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from exc
    with f:
        r = _Reader(f, path, os.fstat(f.fileno()).st_size)
        if r.take(4) != _MAGIC:
            raise ModelError(f"{path} is not a GGUF file")
        version = r.unpack("<I")
        if version not in (2, 3):
            raise ModelError(f"{path}: GGUF version {version} is not supported")
        # The smallest tensor entry: 8-byte name length, 4-byte n_dims, 4-byte type, 8-byte
        # offset; the smallest key-value: 8-byte key length and 4-byte type.
        n_tensors = r.count(24)
        n_kv = r.count(12)
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.unpack("<I"), keep_array=not key.startswith("tokenizer."))
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.unpack("<I")
            if not 1 <= n_dims <= 4:
                raise ModelError(f"{path}: tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to 4)")
            shape = tuple(r.unpack("<Q") for _ in range(n_dims))
            ggml_type = r.unpack("<I")
            offset = r.unpack("<Q")
            tensors.append((name, ggml_type, shape, offset))
        alignment = meta.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelError(f"{path}: general.alignment {alignment!r} is not a power of two")
        pos = f.tell()
        data_start = -(-pos // alignment) * alignment
    return meta, tensors, data_start
