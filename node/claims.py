"""Placement claims: which gateway's placement controller may load and release a model here.

A claim is a lease per model: granted when free, expired or already the caller's, renewed
by its holder's Claim calls, and dropped when the holder gives it up. With a live claim,
loads and releases from any other controller are refused (FAILED_PRECONDITION), so two
gateways on one LAN never converge the same node to two plans. Calls without a controller
id (tests, tools loading stages by hand) are accepted only while nobody holds the claim.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from mesh.errors import InvalidInput, NotClaimHolder
from mesh.types import Claimed, ModelSha

MAX_TTL_S = 120.0  # a controller cannot lock a node out for longer than this without renewing
MAX_CONTROLLER_ID = 64


@dataclass(frozen=True)
class ClaimAnswer:
    granted: bool
    holder: str
    expires_in_s: float


class ClaimTable:
    def __init__(self) -> None:
        self._claims: dict[ModelSha, tuple[str, float]] = {}  # model -> (controller, expiry, monotonic)
        self._lock = threading.Lock()

    def _live(self, model: ModelSha, now: float) -> tuple[str, float] | None:
        held = self._claims.get(model)
        if held is not None and held[1] <= now:
            del self._claims[model]
            return None
        return held

    def claim(self, model: ModelSha, controller_id: str, ttl_s: float, give_up: bool = False) -> ClaimAnswer:
        _check(model, controller_id)
        if not give_up and not 0 < ttl_s <= MAX_TTL_S:
            raise InvalidInput(f"ttl_s must be in (0, {MAX_TTL_S:.0f}], not {ttl_s}")
        now = time.monotonic()
        with self._lock:
            held = self._live(model, now)
            if give_up:
                if held is not None and held[0] == controller_id:
                    del self._claims[model]
                return ClaimAnswer(True, "", 0.0)
            if held is None or held[0] == controller_id:
                self._claims[model] = (controller_id, now + ttl_s)
                return ClaimAnswer(True, controller_id, ttl_s)
            return ClaimAnswer(False, held[0], held[1] - now)

    def check(self, model: ModelSha, controller_id: str, what: str) -> None:
        """Raise unless `controller_id` may change what this node holds of `model`."""
        with self._lock:
            held = self._live(model, time.monotonic())
        if held is not None and held[0] != controller_id:
            raise NotClaimHolder(f"{what}: controller {held[0]} holds this node's claim for the model; "
                                 f"{controller_id or 'a call without a controller id'} may not change it")

    def held(self) -> tuple[Claimed, ...]:
        now = time.monotonic()
        with self._lock:
            for model in list(self._claims):
                self._live(model, now)
            return tuple(Claimed(model, holder, round(expiry - now, 3))
                         for model, (holder, expiry) in sorted(self._claims.items()))


def _check(model: ModelSha, controller_id: str) -> None:
    if not model:
        raise InvalidInput("a claim must name its model's sha256")
    if not controller_id or len(controller_id) > MAX_CONTROLLER_ID or not controller_id.isprintable() \
            or not controller_id.isascii():
        raise InvalidInput(f"controller_id must be 1-{MAX_CONTROLLER_ID} printable ASCII characters")
