"""The round engine's wake-up (`engine.tick_wake_at`, `Step.wake_at`): for a snapshot and no
event, a `Tick` at any time before the wake-up decides what it decides now (no effects, WAIT);
at the wake-up of a full snapshot it decides otherwise. Hypothesis, on a fake clock: random
rounds (statuses, deadlines, outstanding nodes' silences, uploads still arriving, summaries as
hub/store/rounds.py reads them at each tick) and random times before the wake-up."""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from gridswarm.hub import engine
from gridswarm.hub.engine import RoundSnapshot, RunSnapshot, Tick, _silent_at, step
from gridswarm.hub.lifecycle import RunState
from gridswarm.hub.rounds import (
    ARRIVING_GRACE_S,
    AssignmentState,
    Decision,
    RoundRules,
    RoundState,
    Screening,
    lost_assignments,
)
from gridswarm.hub.states import AssignmentStatus, RoundStatus

NOW_S = 1_800_000_000.0
STATUSES = [
    AssignmentStatus.ASSIGNED,
    AssignmentStatus.SUBMITTED,
    AssignmentStatus.MISSED,
    AssignmentStatus.RELEASED,
]


@st.composite
def rounds(draw: st.DrawFn) -> tuple[RoundSnapshot, RoundRules]:
    """A full round snapshot (every assignment listed) and its rules, around NOW_S."""
    liveness_s = draw(st.sampled_from([1.0, 8.0, 20.0, 30.0, 180.0]))
    quorum = draw(st.integers(1, 4))
    rules = RoundRules(
        quorum=quorum,
        min_nodes=quorum,
        max_nodes=8,
        deadline_s=draw(st.sampled_from([10.0, 60.0, 120.0])),
        liveness_s=liveness_s,
        secagg_stage_timeout_s=draw(st.sampled_from([None, None, 30.0])),
    )
    status = draw(st.sampled_from(list(RoundStatus)))
    offsets = st.floats(-400.0, 400.0, allow_nan=False) | st.sampled_from([0.0, -liveness_s])
    assignments = tuple(
        AssignmentState(f"n{i}", draw(st.sampled_from(STATUSES)), NOW_S + draw(offsets) - 1.0)
        for i in range(draw(st.integers(0, 6)))
    )
    deadline_at = None if status == RoundStatus.PENDING else NOW_S + draw(offsets)
    run_status = draw(st.sampled_from([RunState.ACTIVE] * 6 + [RunState.PAUSED]))
    snap = RoundSnapshot(
        run=RunSnapshot(status=run_status, version=0, tokens_total=0, id="r"),
        number=0,
        base_version=0,
        status=status,
        attempt=0,
        deadline_at=deadline_at,
        assignments=assignments,
        arriving=draw(st.sampled_from([0, 0, 1, 2])),
        accepted=sum(a.status == AssignmentStatus.SUBMITTED for a in assignments),
        screening=draw(st.sampled_from([None] * 8 + [Screening(accepted=1, rejected=0)])),
    )
    return snap, rules


def summary(full: RoundSnapshot, rules: RoundRules, now_s: float) -> RoundSnapshot:
    """What `store.rounds.read_snapshot` reads of `full` at `now_s` for the hub's ticker: counts,
    the outstanding assignments of nodes silent since `now - liveness_s + 1` listed, and the
    earliest last-seen time of all outstanding ones."""
    silent_before = now_s - rules.liveness_s + 1.0
    outstanding = [a for a in full.assignments if a.status == AssignmentStatus.ASSIGNED]
    return replace(
        full,
        assignments=tuple(a for a in outstanding if a.node_last_seen_at < silent_before),
        outstanding=len(outstanding),
        submitted=sum(a.status == AssignmentStatus.SUBMITTED for a in full.assignments),
        outstanding_seen_at=min((a.node_last_seen_at for a in outstanding), default=None),
    )


def quiet(snap: RoundSnapshot, rules: RoundRules, at_s: float) -> bool:
    """A tick at `at_s` decides nothing: no effects, WAIT."""
    tick = step(snap, rules, Tick(), at_s)
    return not tick.effects and tick.decision is Decision.WAIT


def before(wake_at: float, fractions: list[float]) -> list[float]:
    """Times in [NOW_S, wake_at): spread by `fractions`, and the last float before it."""
    span = min(wake_at, NOW_S + 10_000.0) - NOW_S
    times = [NOW_S + f * span for f in fractions]
    if math.isfinite(wake_at) and wake_at > NOW_S:
        times.append(math.nextafter(wake_at, -math.inf))
    return [t for t in times if NOW_S <= t < wake_at]


@settings(max_examples=400, deadline=None)
@given(rounds(), st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=8))
def test_a_tick_before_the_wake_up_decides_as_now(
    case: tuple[RoundSnapshot, RoundRules], fractions: list[float]
) -> None:
    full, rules = case
    now = step(full, rules, Tick(), NOW_S)
    assert now.wake_at is not None
    if now.effects or now.decision is not Decision.WAIT:
        assert now.wake_at == NOW_S  # it changed something: look again at once
        return
    assert now.wake_at >= NOW_S
    for t in before(now.wake_at, fractions):
        assert quiet(full, rules, t), (t, now.wake_at)
    if math.isfinite(now.wake_at):  # and it is the first moment a tick may change something
        assert not quiet(full, rules, now.wake_at)


@settings(max_examples=400, deadline=None)
@given(rounds(), st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=8))
def test_the_wake_up_of_a_summary_holds_for_the_summaries_read_later(
    case: tuple[RoundSnapshot, RoundRules], fractions: list[float]
) -> None:
    """The hub reads a summary at each tick (only silent nodes listed): the wake-up of the one
    read now holds for the ones it would read at any later time before it, and for the whole
    round."""
    full, rules = case
    now = step(summary(full, rules, NOW_S), rules, Tick(), NOW_S)
    assert now.wake_at is not None
    if now.effects or now.decision is not Decision.WAIT:
        assert now.wake_at == NOW_S
        return
    for t in before(now.wake_at, fractions):
        assert quiet(summary(full, rules, t), rules, t), (t, now.wake_at)
        assert quiet(full, rules, t), (t, now.wake_at)


def test_a_summary_that_hides_when_its_nodes_go_silent_is_due_at_once() -> None:
    rules = RoundRules(quorum=1, min_nodes=1, max_nodes=4, deadline_s=60.0)
    snap = RoundSnapshot(
        run=RunSnapshot(status=RunState.ACTIVE, version=0, tokens_total=0),
        number=0,
        base_version=0,
        status=RoundStatus.OPEN,
        attempt=0,
        deadline_at=NOW_S + 60.0,
        outstanding=2,  # neither listed, nor their last-seen times read
        submitted=0,
    )
    assert step(snap, rules, Tick(), NOW_S).wake_at == NOW_S
    seen = replace(snap, outstanding_seen_at=NOW_S - 5.0)
    wake_at = step(seen, rules, Tick(), NOW_S).wake_at
    assert wake_at == math.nextafter(NOW_S + 15.0, math.inf)  # the first float past 20 s


def test_the_deadline_and_its_grace_are_wake_ups() -> None:
    rules = RoundRules(quorum=1, min_nodes=1, max_nodes=4, deadline_s=60.0, liveness_s=1e9)
    node = AssignmentState("a", AssignmentStatus.ASSIGNED, NOW_S)
    snap = RoundSnapshot(
        run=RunSnapshot(status=RunState.ACTIVE, version=0, tokens_total=0),
        number=0,
        base_version=0,
        status=RoundStatus.OPEN,
        attempt=0,
        deadline_at=NOW_S + 30.0,
        assignments=(node,),
    )
    assert engine.tick_wake_at(snap, rules, NOW_S) == NOW_S + 30.0
    arriving = replace(snap, arriving=1)
    assert engine.tick_wake_at(arriving, rules, NOW_S) == NOW_S + 30.0 + ARRIVING_GRACE_S
    pending = replace(snap, status=RoundStatus.PENDING, deadline_at=None, assignments=())
    assert engine.tick_wake_at(pending, rules, NOW_S) == math.inf


@settings(max_examples=500, deadline=None)
@given(
    st.floats(0.0, 4e9, allow_nan=False),
    st.floats(1e-3, 1e5, allow_nan=False),
)
def test_silence_is_found_at_the_first_float_past_it(seen: float, liveness_s: float) -> None:
    rules = RoundRules(quorum=1, min_nodes=1, max_nodes=1, deadline_s=1.0, liveness_s=liveness_s)
    node = (AssignmentState("a", AssignmentStatus.ASSIGNED, seen),)
    state = RoundState(RoundStatus.OPEN, None, node)
    at = _silent_at(seen, liveness_s)
    assert lost_assignments(state, rules, at) == ["a"]
    assert lost_assignments(state, rules, math.nextafter(at, -math.inf)) == []
