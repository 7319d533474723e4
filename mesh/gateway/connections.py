"""The gateway's HTTP connections: a cap on how many it holds and a deadline for each
request's headers.

uvicorn has a keep-alive timeout (idle after an answer) and `limit_concurrency` (503 to a
request beyond it), but no deadline for the headers themselves: a client that connects
and sends nothing, or drips a byte a second, holds its connection for ever, and enough of
them exhaust the process's file descriptors. This protocol, uvicorn's own h11 protocol
with two additions, closes a connection whose request head has not arrived within
`Timeouts.http_header_s` of the connection (or of the previous answer on it), and closes
at once a connection past twice `Limits.max_http_connections` (up to that, one past the
cap gets uvicorn's 503 for its request and a short head deadline).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

# A connection past the cap may still send its request for its 503 within this long; one
# that says nothing is closed sooner than a normal one, so a flood cannot pile up.
OVER_CAP_HEAD_S = 1.0
# At most one log line per this many seconds per kind of refusal: a flood is a count, not a log.
LOG_EVERY_S = 10.0


class _Throttled:
    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def warn(self, kind: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last[kind] = now
            log.warning(message, *args)


def guarded_protocol(header_timeout_s: float, max_connections: int,
                     on_refused: Callable[[str], None]) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a head deadline and a hard connection cap; `on_refused(reason)`
    counts each connection closed ("header_timeout" or "connections")."""
    throttle = _Throttled()
    hard_cap = 2 * max_connections

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _armed_for: object = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            held = len(self.connections)
            if held > hard_cap:
                on_refused("connections")
                throttle.warn("connections", "more than %d HTTP connections: closing new ones at once", hard_cap)
                transport.abort()
                return
            over = held > max_connections
            if over:
                on_refused("connections")
                throttle.warn("over_cap", "more than %d HTTP connections: answering 503", max_connections)
            self._arm_head_deadline(min(OVER_CAP_HEAD_S, header_timeout_s) if over else header_timeout_s)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not self._armed_for:
                self._disarm()  # the head is in: the request is the app's (and its body deadline's) now

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # The next request's head gets the same deadline, counted from this answer (a
            # pipelined request may already be under way: then it is armed when that one ends).
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm_head_deadline(header_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm_head_deadline(self, seconds: float) -> None:
            self._disarm()
            self._armed_for = self.cycle  # a new head makes a new cycle
            self._head_timer = self.loop.call_later(seconds, self._head_late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if self.cycle is self._armed_for and not self.transport.is_closing():
                on_refused("header_timeout")
                throttle.warn("header_timeout", "closing an HTTP connection from %s: no request headers "
                              "within the deadline", self.client[0] if self.client else "?")
                self.transport.close()

    return GuardedH11Protocol
