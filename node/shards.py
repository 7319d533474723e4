"""Shard shipping: a node without the model file keeps a sparse copy of it, holding only the
bytes of the layers it serves, fetched from a peer that has the whole file.

The copy has the file's real layout (the header at the start, each tensor at its own
offset, holes elsewhere), so the stage engine reads it like the original. A manifest next
to it lists the byte ranges present, each with the sha256 the source sent and this node
checked; after a restart those ranges are used again without a fetch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from mesh.errors import ModelError, PeerError
from mesh.model_store import Progress, ProgressLog
from mesh.types import LayerRange, ModelHeld, ShardChunk

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # bytes per ShardChunk message: far below the gRPC message limit


class ShardSource(Protocol):
    """Where missing bytes come from (a NodeClient of a peer holding the whole file)."""

    address: str

    def fetch_shard(self, model_sha256: str, ranges: list[tuple[int, int]], header: bool) -> AsyncIterator[ShardChunk]:
        ...


class ShardCache:
    def __init__(self, directory: Path, model: ModelHeld) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.path = directory / f"{model.sha256}.gguf"
        self._manifest = directory / f"{model.sha256}.json"
        self._ranges: dict[int, tuple[int, str]] = {}  # offset -> (length, sha256)
        self._lock = threading.Lock()
        if self._manifest.exists() and self.path.exists():
            saved = json.loads(self._manifest.read_text())
            if saved.get("file_bytes") == model.file_bytes:
                self._ranges = {int(o): (int(n), str(h)) for o, n, h in saved["ranges"]}

    @property
    def has_header(self) -> bool:
        return 0 in self._ranges

    def present_bytes(self) -> int:
        return sum(n for n, _ in self._ranges.values())

    def missing(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(o, n) for o, n in ranges if self._ranges.get(o, (-1, ""))[0] != n]

    def _save(self) -> None:
        tmp = self._manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": self.model.name, "file_bytes": self.model.file_bytes,
                                   "ranges": [[o, n, h] for o, (n, h) in sorted(self._ranges.items())]}))
        os.replace(tmp, self._manifest)

    async def fetch(self, source: ShardSource, ranges: list[tuple[int, int]], *, header: bool = False,
                    progress: Progress | None = None) -> int:
        """Fetch `ranges` (or the header) from `source` into the sparse file, checking each
        range's sha256; returns the bytes fetched. Nothing unchecked is recorded as present."""
        todo = [] if header else self.missing(ranges)
        if not header and not todo:
            return 0
        total = sum(n for _, n in todo)
        progress = progress or ProgressLog()
        fetched = 0
        digest = hashlib.sha256()  # of the range being received: ranges arrive one after another
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, max(os.fstat(fd).st_size, self.model.file_bytes))
            async for chunk in source.fetch_shard(self.model.sha256, todo, header):
                end = chunk.offset + len(chunk.data)
                inside = (header and chunk.offset == fetched) or \
                    any(o <= chunk.offset and end <= o + n for o, n in todo)
                if end > self.model.file_bytes or not inside:
                    raise PeerError(f"{source.address} sent bytes that were not asked for", retryable=False)
                if chunk.range_sha256 and not header and (chunk.range_offset, chunk.range_length) not in todo:
                    raise PeerError(f"{source.address} closed a range that was not asked for", retryable=False)
                os.pwrite(fd, chunk.data, chunk.offset)
                digest.update(chunk.data)
                fetched += len(chunk.data)
                progress(f"shard of {self.model.name} from {source.address}", fetched, max(total, fetched))
                if chunk.range_sha256:
                    if digest.hexdigest() != chunk.range_sha256:
                        raise ModelError(f"bytes [{chunk.range_offset}, +{chunk.range_length}) from "
                                         f"{source.address} do not match their sha256")
                    with self._lock:
                        self._ranges[chunk.range_offset] = (chunk.range_length, chunk.range_sha256)
                        self._save()
                    digest = hashlib.sha256()
        finally:
            os.close(fd)
        missing = [] if header else self.missing(todo)
        if missing or (header and not self.has_header):
            raise PeerError(f"{source.address} did not send all the bytes asked for")
        return fetched


def stage_byte_ranges(path: Path, layers: LayerRange) -> list[tuple[int, int]]:
    """(offset, length) of every tensor a stage of `layers` reads, from the file's header."""
    from node.engines.stage.weights import needed_tensors, read_header

    args, tensors = read_header(path)
    names = needed_tensors(args, tensors, layers.first, layers.last_exclusive)
    return sorted((tensors[n].offset, tensors[n].n_bytes) for n in names)
