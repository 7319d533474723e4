"""What a node is busy with (a shard transfer, a load), so its Info, and so the cluster page,
can show progress of every long operation, not only its log."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from mesh.model_store import ProgressLog


class Activity:
    def __init__(self) -> None:
        self._what = ""
        self._fraction = -1.0  # -1: no measure of progress (a load), else 0..1
        self._lock = threading.Lock()
        self._log = ProgressLog()

    def progress(self, what: str, done: int, total: int) -> None:
        """A Progress callback (mesh.model_store): logs and reports."""
        self._log(what, done, total)
        with self._lock:
            self._what, self._fraction = what, (done / total if total else 1.0)

    @contextmanager
    def doing(self, what: str) -> Iterator[None]:
        with self._lock:
            self._what, self._fraction = what, -1.0
        try:
            yield
        finally:
            with self._lock:
                self._what, self._fraction = "", -1.0

    def snapshot(self) -> tuple[str, float]:
        with self._lock:
            return self._what, self._fraction
