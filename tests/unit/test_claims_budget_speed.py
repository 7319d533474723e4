"""A node's claim table (one lease per model: grant, renew, refuse, expire, give up), its
memory budget (shared by everything it holds, a clear refusal past it) and its speed meter
(plans on the probe, shows real steps, re-probes only when due and idle)."""

from __future__ import annotations

import random
import threading
import time

import pytest

import node.budget as budget_module
import node.speed as speed_module
from mesh.errors import CapacityExhausted, InvalidInput, NotClaimHolder
from mesh.types import Claimed, ModelSha
from node.budget import MemoryBudget
from node.claims import MAX_CONTROLLER_ID, MAX_TTL_S, ClaimTable
from node.probe import Memory
from node.speed import SMOOTHING, SpeedMeter

MiB = 2**20
MODEL = ModelSha("a" * 64)
OTHER = ModelSha("b" * 64)


# ---------------------------------------------------------------------------- claims


def test_a_free_claim_is_granted_and_its_holder_renews_it() -> None:
    table = ClaimTable()
    first = table.claim(MODEL, "gw-a", 10.0)
    assert (first.granted, first.holder, first.expires_in_s) == (True, "gw-a", 10.0)
    time.sleep(0.05)
    (held,) = table.held()
    assert held.model_sha256 == MODEL and held.controller_id == "gw-a" and held.expires_in_s < 10.0
    renewed = table.claim(MODEL, "gw-a", 30.0)
    assert renewed.granted and renewed.expires_in_s == 30.0
    assert table.held()[0].expires_in_s > 29.0


def test_another_controller_is_refused_and_told_who_holds_it() -> None:
    table = ClaimTable()
    table.claim(MODEL, "gw-a", 10.0)
    answer = table.claim(MODEL, "gw-b", 10.0)
    assert not answer.granted and answer.holder == "gw-a" and 9.0 < answer.expires_in_s <= 10.0
    assert table.held() == (Claimed(MODEL, "gw-a", pytest.approx(10.0, abs=0.5)),)  # type: ignore[arg-type]
    # One lease per model: another model is free to claim.
    assert table.claim(OTHER, "gw-b", 10.0).granted
    assert [c.controller_id for c in table.held()] == ["gw-a", "gw-b"]


def test_a_claim_not_renewed_expires() -> None:
    table = ClaimTable()
    table.claim(MODEL, "gw-a", 0.2)
    assert not table.claim(MODEL, "gw-b", 1.0).granted
    time.sleep(0.3)
    assert table.held() == ()
    taken = table.claim(MODEL, "gw-b", 1.0)
    assert taken.granted and taken.holder == "gw-b"
    table.check(MODEL, "gw-b", "LoadStage")
    with pytest.raises(NotClaimHolder):
        table.check(MODEL, "gw-a", "LoadStage")


def test_giving_up_frees_the_claim_only_for_its_holder() -> None:
    table = ClaimTable()
    table.claim(MODEL, "gw-a", 10.0)
    answer = table.claim(MODEL, "gw-b", 0.0, give_up=True)  # not b's to give up: nothing changes
    assert answer.granted and answer.holder == ""
    assert table.held()[0].controller_id == "gw-a"
    table.claim(MODEL, "gw-a", 0.0, give_up=True)  # no ttl is needed to give up
    assert table.held() == ()
    assert table.claim(MODEL, "gw-b", 10.0).granted
    assert table.claim(OTHER, "gw-c", 0.0, give_up=True).granted  # nothing held: fine


def test_check_lets_only_the_holder_change_the_node() -> None:
    table = ClaimTable()
    table.check(MODEL, "", "LoadStage")  # nobody holds it: even a call without a controller id
    table.check(MODEL, "gw-b", "LoadStage")
    table.claim(MODEL, "gw-a", 10.0)
    table.check(MODEL, "gw-a", "LoadStage")
    with pytest.raises(NotClaimHolder, match=r"gw-a holds .*gw-b may not"):
        table.check(MODEL, "gw-b", "LoadStage")
    with pytest.raises(NotClaimHolder, match="without a controller id"):
        table.check(MODEL, "", "ReleaseHolding")
    table.check(OTHER, "gw-b", "LoadStage")  # a claim covers its model only


@pytest.mark.parametrize("controller", ["", "x" * (MAX_CONTROLLER_ID + 1), "gé", "gw\n", "gw\x00"])
def test_bad_controller_ids_are_refused(controller: str) -> None:
    table = ClaimTable()
    with pytest.raises(InvalidInput, match="controller_id"):
        table.claim(MODEL, controller, 10.0)
    with pytest.raises(InvalidInput, match="controller_id"):
        table.claim(MODEL, controller, 0.0, give_up=True)
    assert table.held() == ()


def test_the_longest_controller_id_is_accepted() -> None:
    assert ClaimTable().claim(MODEL, "x" * MAX_CONTROLLER_ID, 1.0).granted


@pytest.mark.parametrize("ttl", [0.0, -1.0, MAX_TTL_S + 0.001, float("nan"), float("inf")])
def test_bad_ttls_are_refused(ttl: float) -> None:
    table = ClaimTable()
    with pytest.raises(InvalidInput, match="ttl_s"):
        table.claim(MODEL, "gw-a", ttl)
    assert table.held() == ()
    assert table.claim(MODEL, "gw-a", MAX_TTL_S).granted


def test_a_claim_must_name_its_model() -> None:
    with pytest.raises(InvalidInput, match="sha256"):
        ClaimTable().claim(ModelSha(""), "gw-a", 10.0)


def test_of_many_controllers_claiming_at_once_exactly_one_wins() -> None:
    table = ClaimTable()
    barrier = threading.Barrier(16)
    winners: list[str] = []

    def contend(i: int) -> None:
        barrier.wait()
        if table.claim(MODEL, f"gw-{i}", 10.0).granted:
            winners.append(f"gw-{i}")

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and table.held()[0].controller_id == winners[0]


# ---------------------------------------------------------------------------- memory budget


@pytest.fixture
def free_memory(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """What the budget sees as free memory; a test sets free[0]."""
    free = [1000 * MiB]
    monkeypatch.setattr(budget_module, "memory", lambda: Memory(total=4000 * MiB, free=free[0]))
    return free


def test_the_limit_is_the_budget_when_memory_is_free(free_memory: list[int]) -> None:
    budget = MemoryBudget(100 * MiB)
    assert budget.total() == 100 * MiB
    budget.check(100 * MiB, "a stage")
    with pytest.raises(CapacityExhausted, match=r"needs about 101 MiB.*budget of 100 MiB \(--memory-limit\)"):
        budget.check(101 * MiB, "a stage")


def test_without_a_limit_free_memory_and_what_is_held_make_the_budget(free_memory: list[int]) -> None:
    budget = MemoryBudget(0)
    held = [300 * MiB]
    budget.add_holder(lambda: held[0])
    assert budget.total() == 1300 * MiB  # what it holds is the node's to re-plan
    budget.check(1000 * MiB, "the replica")
    with pytest.raises(CapacityExhausted, match=r"300 MiB already held.*\(free memory\)"):
        budget.check(1000 * MiB + 1, "the replica")
    free_memory[0] = 50 * MiB
    assert budget.total() == 350 * MiB


def test_every_holder_counts_and_a_load_counts_what_it_replaces(free_memory: list[int]) -> None:
    budget = MemoryBudget(100 * MiB)
    stages, replica = [40 * MiB], [30 * MiB]
    budget.add_holder(lambda: stages[0])
    budget.add_holder(lambda: replica[0])
    assert budget.held() == 70 * MiB
    budget.check(30 * MiB, "layers [0, 5)")
    with pytest.raises(CapacityExhausted, match=r"layers \[0, 5\) needs about 31 MiB; with 70 MiB already held"):
        budget.check(31 * MiB, "layers [0, 5)")
    budget.check(60 * MiB, "the replica again", replacing=30 * MiB)  # its old copy goes
    replica[0] = 0  # held figures are read at each check
    budget.check(60 * MiB, "the replica")


def test_a_limit_above_free_memory_is_capped_by_it(free_memory: list[int]) -> None:
    free_memory[0] = 80 * MiB
    budget = MemoryBudget(100 * MiB)
    assert budget.total() == 80 * MiB
    with pytest.raises(CapacityExhausted, match=r"\(free memory\)"):
        budget.check(81 * MiB, "a stage")


# ---------------------------------------------------------------------------- speed meter


def test_planning_speed_is_the_probe_and_step_speed_is_shown_apart() -> None:
    meter = SpeedMeter(40.0)
    assert (meter.tokens_per_second, meter.step_tokens_per_second, meter.source) == (40.0, 0.0, "start-up probe")
    meter.record_stage_step(0.01, 0.5)  # half the model's weights in 10 ms: 50 whole-model tokens/s
    assert meter.step_tokens_per_second == pytest.approx(50.0)
    meter.record_stage_step(0.01, 0.25)  # 25 tok/s, smoothed in
    assert meter.step_tokens_per_second == pytest.approx(SMOOTHING * 25.0 + (1 - SMOOTHING) * 50.0)
    assert meter.tokens_per_second == 40.0  # real steps are never planned on


def test_replica_tokens_are_measured_and_nonsense_is_ignored() -> None:
    meter = SpeedMeter(10.0)
    for bad in ((0, 1.0), (5, 0.0), (-1, 1.0)):
        meter.record_tokens(*bad)
    meter.record_stage_step(0.0, 0.5)
    meter.record_stage_step(0.1, 0.0)
    assert meter.step_tokens_per_second == 0.0
    meter.record_tokens(30, 0.5)
    assert meter.step_tokens_per_second == pytest.approx(60.0)


def test_an_idle_probe_replaces_the_planning_speed() -> None:
    meter = SpeedMeter(40.0)
    meter.record_probe(12.0)
    assert (meter.tokens_per_second, meter.source) == (12.0, "idle probe")


def test_a_re_probe_is_due_after_the_start_up_rush_and_only_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speed_module, "REPROBE_JITTER_S", 0.0)
    monkeypatch.setattr(speed_module, "REPROBE_FIRST_S", 0.2)
    monkeypatch.setattr(speed_module, "REPROBE_EVERY_S", 3600.0)
    monkeypatch.setattr(speed_module, "IDLE_BEFORE_PROBE_S", 0.2)
    started = time.monotonic()
    meter, idle = SpeedMeter(40.0), SpeedMeter(40.0)
    assert not meter.probe_due(started)  # the start-up rush is not over
    time.sleep(0.25)
    assert meter.probe_due(started)
    meter.touch()  # real work now: the probe would measure our own load
    assert not meter.probe_due(started)
    time.sleep(0.25)
    assert meter.probe_due(started)
    meter.record_stage_step(0.01, 0.5)  # a real step is work too
    assert not meter.probe_due(started)
    time.sleep(0.25)
    meter.record_probe(20.0)  # after a re-probe the next waits REPROBE_EVERY_S
    assert not meter.probe_due(started)
    # The node's own start counts too: the same meter is not due for a node that started just now.
    assert idle.probe_due(started)
    assert not idle.probe_due(time.monotonic())


def test_nodes_started_together_do_not_re_probe_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speed_module, "random", random.Random(7))
    monkeypatch.setattr(speed_module, "REPROBE_FIRST_S", 0.0)
    monkeypatch.setattr(speed_module, "IDLE_BEFORE_PROBE_S", 0.0)
    monkeypatch.setattr(speed_module, "REPROBE_JITTER_S", 0.3)
    started = time.monotonic()
    meters = [SpeedMeter(40.0) for _ in range(4)]
    due_at: list[float] = [0.0] * 4
    deadline = time.monotonic() + 2.0
    while not all(due_at) and time.monotonic() < deadline:
        for i, meter in enumerate(meters):
            if not due_at[i] and meter.probe_due(started):
                due_at[i] = time.monotonic() - started
        time.sleep(0.005)
    assert all(due_at)
    assert max(due_at) - min(due_at) > 0.05  # spread over the jitter, not all at once
