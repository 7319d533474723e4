"""The one error and metrics path of a node's answers: its gRPC methods and its step socket.

`answering` times a call and turns what it raises into the error to answer with: our own
errors (mesh.errors) as they are, any other failure (a bug, the disk, memory) as INTERNAL,
logged, so the node keeps serving. It counts the error by method and code, and records the
call's duration, whichever way it ended. How the error is then sent is the caller's: a gRPC
status (node.service) or an ERROR frame (node.step_server).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from mesh.errors import EdgeMeshError
from mesh.metrics import NodeMetrics

log = logging.getLogger(__name__)


class Answer:
    """How an answered call ended: `error` is None when it succeeded."""

    def __init__(self) -> None:
        self.error: EdgeMeshError | None = None


@contextmanager
def answering(metrics: NodeMetrics, method: str, what: str = "") -> Iterator[Answer]:
    """`what` names the work in the INTERNAL error's message ("<what> failed: ..."); the method
    by default. Cancellation (BaseException) passes through, timed but not counted."""
    answer = Answer()
    started = time.monotonic()
    try:
        yield answer
    except EdgeMeshError as exc:
        answer.error = exc
    except Exception as exc:
        log.exception("%s failed", what or method)
        answer.error = EdgeMeshError(f"{what or method} failed: {exc}")  # its code: INTERNAL
    finally:
        if answer.error is not None:
            metrics.rpc_errors.labels(method, answer.error.grpc_code).inc()
        metrics.rpc_duration.labels(method).observe(time.monotonic() - started)
