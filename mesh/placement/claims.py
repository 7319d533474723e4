"""The controller's side of the placement claims (node.claims has the node's side).

A controller may change what nodes hold only while it holds every ready node's claim for
the model. The claims are leases: renewed by a background task every third of their
lifetime, for as long as the controller holds them (a round that loads a big model for
minutes keeps them), given up when the gateway stops, and lapsing on their own when it
vanishes. A controller that holds no claim and sees another's in the nodes' Info stays out
(it does not even claim a node that just joined); when two controllers each hold some claims
(they started together), the one with the lower id keeps going and the other gives its
claims up, so they never converge the nodes both at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from mesh.errors import EdgeMeshError
from mesh.membership import Membership
from mesh.types import ModelSha, NodeId, NodeInfo

log = logging.getLogger(__name__)


class ClaimKeeper:
    def __init__(self, membership: Membership, model_sha: ModelSha, controller_id: str, ttl_s: float) -> None:
        self._membership = membership
        self._model_sha = model_sha
        self.controller_id = controller_id
        self._ttl_s = ttl_s
        self.claimed: set[NodeId] = set()
        self.rival = ""  # the controller that holds claims we wanted, if any
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._renew())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.give_up(set(self.claimed))

    async def _claim(self, node: NodeId, give_up: bool = False) -> tuple[bool, str]:
        """(granted, holder); holder "" when the node did not answer."""
        client = self._membership.client_for(node)
        if client is None:
            return False, ""
        try:
            granted, holder, _ = await client.claim(self._model_sha, self.controller_id,
                                                    0.0 if give_up else self._ttl_s, give_up=give_up)
        except EdgeMeshError as exc:
            log.warning("claim on %s failed: %s", self._membership.name_of(node), exc)
            return False, ""
        return granted, holder

    async def claim_all(self, infos: Sequence[NodeInfo]) -> tuple[bool, set[NodeId]]:
        """Claim (or renew) every ready node: (whether this controller may act, the nodes that
        did not answer). A node that does not answer is left out of the plan (it is most likely
        failing, and membership will say so); a node held by another controller stops us."""
        foreign = {c.controller_id for i in infos for c in i.claims
                   if c.model_sha256 == self._model_sha and c.controller_id != self.controller_id}
        if foreign and not self.claimed:
            # Another gateway places the model (its claims are in the nodes' Info): leave it be,
            # and do not grab a node that just joined, which would split the claims between us.
            self.rival = min(foreign)
            return False, set()
        nodes = [i.node_id for i in infos]
        answers = await asyncio.gather(*(self._claim(n) for n in nodes))
        self.claimed = {n for n, (granted, _) in zip(nodes, answers, strict=True) if granted}
        silent = {n for n, (granted, holder) in zip(nodes, answers, strict=True) if not granted and not holder}
        rivals = {holder for granted, holder in answers if not granted and holder}
        self.rival = min(rivals, default="")
        if rivals and min(rivals) < self.controller_id:
            # Another gateway has precedence: let it converge the nodes alone.
            await self.give_up(set(self.claimed))
        return not rivals and bool(self.claimed), silent

    async def give_up(self, nodes: set[NodeId]) -> None:
        await asyncio.gather(*(self._claim(n, give_up=True) for n in nodes))
        self.claimed -= nodes

    async def _renew(self) -> None:
        """Keep the claims held while a round runs long (a load of minutes)."""
        while True:
            await asyncio.sleep(self._ttl_s / 3)
            for node in list(self.claimed):
                granted, _ = await self._claim(node)
                if not granted:
                    self.claimed.discard(node)
