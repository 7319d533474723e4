"""From what nodes report (Info) to the placements the scheduler can route to.

A replica placement is a ready node serving the whole model. A pipeline placement is a
chain of ready nodes whose loaded stages cover layers [0, n_layers) contiguously, each
node used once. Pure functions of the membership view, deterministic in node-id order.
"""

from __future__ import annotations

from collections.abc import Iterable

from mesh.types import LayerRange, ModelSha, NodeId, NodeInfo, Placement, StageHeld, StagePlacement


def replica_placements(infos: Iterable[NodeInfo], model_sha: ModelSha) -> list[Placement]:
    result = []
    for info in sorted(infos, key=lambda i: i.node_id):
        for model in info.models:
            if model.sha256 == model_sha:
                result.append(Placement(kind="replica", model_sha256=model.sha256, model_name=model.name,
                                        stages=(StagePlacement(info.node_id, LayerRange(0, model.n_layers)),)))
    return result


def model_layers(infos: Iterable[NodeInfo], model_sha: ModelSha) -> tuple[str, int] | None:
    """(name, n_layers) of the model from any node that has its file."""
    for info in infos:
        for model in (*info.models, *info.files):
            if model.sha256 == model_sha:
                return model.name, model.n_layers
    return None


def pipeline_placements(infos: Iterable[NodeInfo], model_sha: ModelSha) -> list[Placement]:
    """Chains of stages covering every layer once; greedy from layer 0, preferring the
    longest next stage, so the fewest hops win; each node serves in one chain at most."""
    infos = sorted(infos, key=lambda i: i.node_id)
    found = model_layers(infos, model_sha)
    if found is None:
        return []
    name, n_layers = found
    offers: list[tuple[NodeId, StageHeld]] = [(i.node_id, s) for i in infos for s in i.stages
                                              if s.model_sha256 == model_sha]
    used: set[NodeId] = set()
    chains: list[Placement] = []
    while True:
        chain: list[StagePlacement] = []
        taken: set[NodeId] = set()
        at = 0
        while at < n_layers:
            options = [(node, s) for node, s in offers if s.layers.first == at and node not in used | taken]
            if not options:
                break
            node, stage = max(options, key=lambda o: (o[1].layers.last_exclusive, [-ord(c) for c in o[0]]))
            chain.append(StagePlacement(node, stage.layers))
            taken.add(node)
            at = stage.layers.last_exclusive
        if at != n_layers or not chain:
            return chains
        used |= taken
        chains.append(Placement(kind="pipeline", model_sha256=model_sha, model_name=name, stages=tuple(chain)))


def stage_slots(info: NodeInfo, model_sha: ModelSha, layers: LayerRange) -> int:
    for stage in info.stages:
        if stage.model_sha256 == model_sha and stage.layers == layers:
            return stage.slots
    return 0
