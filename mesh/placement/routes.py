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
    """Chains of stages covering every layer once, each node used in one chain at most. Each
    chain is the one with the fewest hops among the nodes left (then the longest stages
    first, then node ids), found by a search that backtracks: a half-loaded new pipeline
    beside a running one (a stage whose next part is still loading) never hides the running one."""
    infos = sorted(infos, key=lambda i: i.node_id)
    found = model_layers(infos, model_sha)
    if found is None:
        return []
    name, n_layers = found
    starting: dict[int, list[tuple[NodeId, StageHeld]]] = {}
    for info in infos:
        for stage in info.stages:
            if stage.model_sha256 == model_sha and stage.layers.last_exclusive <= n_layers:
                starting.setdefault(stage.layers.first, []).append((info.node_id, stage))
    for options in starting.values():
        options.sort(key=lambda o: (-o[1].layers.last_exclusive, o[0]))
    used: set[NodeId] = set()
    chains: list[Placement] = []
    while True:
        chain = next((c for hops in range(1, len(infos) + 1)
                      if (c := _chain(0, n_layers, starting, used, hops)) is not None), None)
        if chain is None:
            return chains
        used |= {node for node, _ in chain}
        chains.append(Placement(kind="pipeline", model_sha256=model_sha, model_name=name,
                                stages=tuple(StagePlacement(node, layers) for node, layers in chain)))


def _chain(at: int, n_layers: int, starting: dict[int, list[tuple[NodeId, StageHeld]]], used: set[NodeId],
           hops: int) -> list[tuple[NodeId, LayerRange]] | None:
    """Stages from layer `at` to the end in at most `hops` stages, on nodes not in `used`."""
    if at == n_layers:
        return []
    if hops == 0:
        return None
    for node, stage in starting.get(at, ()):
        if node in used:
            continue
        rest = _chain(stage.layers.last_exclusive, n_layers, starting, used | {node}, hops - 1)
        if rest is not None:
            return [(node, stage.layers), *rest]
    return None


def routable(infos: Iterable[NodeInfo], model_sha: ModelSha) -> list[Placement]:
    """Every placement the scheduler can route to: replicas, then pipelines."""
    infos = list(infos)
    return replica_placements(infos, model_sha) + pipeline_placements(infos, model_sha)


def stage_slots(info: NodeInfo, model_sha: ModelSha, layers: LayerRange) -> int:
    for stage in info.stages:
        if stage.model_sha256 == model_sha and stage.layers == layers:
            return stage.slots
    return 0
