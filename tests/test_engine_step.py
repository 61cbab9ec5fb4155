"""The round engine's transition function (hub/engine.py `step`) on its own: no database, no
hub, an injected clock. Unit cases for the paths the hub takes (a lost node, a deadline
re-plan, screening that breaks the quorum, a budget that finishes the run) and hypothesis
properties over arbitrary snapshots and event sequences."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gridswarm.hub.acceptance import AssignmentFacts, ClaimFacts, ClaimRules, EnergyFacts
from gridswarm.hub.engine import (
    AdvanceRun,
    AdvanceStage,
    Arrived,
    Asked,
    AskWait,
    Assign,
    CloseRound,
    ContributionRow,
    FailSecAgg,
    FinishRun,
    FinishSecAgg,
    FinishSource,
    IllegalEvent,
    Left,
    MarkLate,
    MarkMissed,
    MarkSubmitted,
    MissOutstanding,
    OpenNextRound,
    OpenRound,
    OpenSecAgg,
    PlanRules,
    Published,
    RecordContribution,
    ReleaseOutstanding,
    Replan,
    RoundSnapshot,
    RunSnapshot,
    Screened,
    SeatFacts,
    SecAggFailed,
    SecAggProgress,
    SecAggRecovered,
    Step,
    Tick,
    WorkFacts,
    left_effects,
    place_refusal,
    round_wait,
    run_wait,
    seat_refusal,
    step,
)
from gridswarm.hub.lifecycle import RunState
from gridswarm.hub.rounds import AssignmentState, Decision, RoundRules, Screening
from gridswarm.hub.secagg_stages import NEXT_STAGE, StageProgress
from gridswarm.hub.states import AssignmentStatus, RoundStatus
from gridswarm.protocol import Refusal
from tests.examples import examples

A, S = AssignmentStatus.ASSIGNED, AssignmentStatus.SUBMITTED
RULES = RoundRules(quorum=2, min_nodes=2, max_nodes=4, deadline_s=60.0, liveness_s=20.0)


def snapshot(*assignments: tuple[str, AssignmentStatus, float], **kw) -> RoundSnapshot:
    """An open round 3 of an active run at version 3, deadline at t=100."""
    fields = {
        "run": RunSnapshot(RunState.ACTIVE, version=3, tokens_total=300),
        "number": 3,
        "base_version": 3,
        "status": RoundStatus.OPEN,
        "attempt": 0,
        "deadline_at": 100.0,
        "assignments": tuple(AssignmentState(n, st, seen) for n, st, seen in assignments),
        "accepted": sum(st == S for _, st, _ in assignments),
    } | kw
    return RoundSnapshot(**fields)


def test_a_lost_node_is_missed_and_the_round_closes_without_it():
    # b went silent at t=10; at t=40 (past liveness 20 s) its place is given up, and with a
    # and c in the round is all in with its quorum
    snap = snapshot(("a", S, 39.0), ("b", A, 10.0), ("c", S, 39.0))
    out = step(snap, RULES, Tick(), 40.0)
    assert out.effects == (MarkMissed(("b",)),)
    assert out.decision is Decision.CLOSE
    assert [a.status for a in out.snapshot.assignments] == [S, AssignmentStatus.MISSED, S]
    # heard from in time: nothing is lost, the round waits for b
    out = step(snap, RULES, Tick(), 25.0)
    assert out == Step(snap, (), Decision.WAIT)


def test_the_deadline_replans_without_quorum_keeping_what_was_accepted():
    snap = snapshot(("a", S, 99.0), ("b", A, 99.0))
    out = step(snap, RULES, Tick(), 100.0)
    assert out.decision is Decision.REPLAN
    assert out.effects == (MissOutstanding(), Replan(attempt=1, deadline_at=160.0))
    assert out.snapshot.status is RoundStatus.OPEN and out.snapshot.deadline_at == 160.0
    # nothing accepted: back to pending, its deadline gone until a node opens it again
    empty = snapshot(("b", A, 99.0))
    out = step(empty, RULES, Tick(), 100.0)
    assert out.effects == (MissOutstanding(), Replan(attempt=1, deadline_at=None))
    assert out.snapshot.status is RoundStatus.PENDING and out.snapshot.deadline_at is None


def test_screening_that_breaks_the_quorum_replans_instead_of_closing():
    snap = snapshot(("a", S, 50.0), ("b", S, 50.0))
    due = step(snap, RULES, Tick(), 50.0)
    assert due.decision is Decision.CLOSE and due.effects == ()
    out = step(due.snapshot, RULES, Screened(Screening(accepted=1, rejected=1)), 50.0)
    assert out.decision is Decision.REPLAN
    assert out.effects == (MissOutstanding(), Replan(attempt=1, deadline_at=110.0))
    assert out.snapshot.accepted == 1 and out.snapshot.screening is None
    with pytest.raises(IllegalEvent):  # nothing to publish after a re-plan
        step(out.snapshot, RULES, Published(4, 400), 50.0)
    # all rejected: nothing kept, pending again
    out = step(due.snapshot, RULES, Screened(Screening(accepted=0, rejected=2)), 50.0)
    assert out.effects[-1] == Replan(attempt=1, deadline_at=None)


def test_publishing_closes_the_round_and_opens_the_next():
    snap = snapshot(("a", S, 50.0), ("b", S, 50.0), ("c", A, 50.0), deadline_at=60.0)
    due = step(replace(snap), RULES, Tick(), 60.0)  # at the deadline with the quorum
    screened = step(due.snapshot, RULES, Screened(Screening(accepted=2, rejected=0)), 60.0)
    assert screened.decision is Decision.CLOSE and screened.effects == ()
    out = step(screened.snapshot, RULES, Published(4, 420), 60.0)
    assert out.effects == (
        MissOutstanding(),
        CloseRound("deadline", 60.0),
        AdvanceRun(4, 420),
        OpenNextRound(4, 4),
    )
    assert out.snapshot.status is RoundStatus.CLOSED and out.snapshot.run.version == 4
    assert AssignmentStatus.ASSIGNED not in {a.status for a in out.snapshot.assignments}
    # before the deadline it closed because everyone was in
    early = snapshot(("a", S, 50.0), ("b", S, 50.0))
    screened = step(
        step(early, RULES, Tick(), 50.0).snapshot, RULES, Screened(Screening(2, 0)), 50.0
    )
    assert step(screened.snapshot, RULES, Published(4, 420), 50.0).effects[1] == CloseRound(
        "all-in", 50.0
    )


@pytest.mark.parametrize(
    ("run", "tokens_total", "privacy_stop", "finish"),
    [
        (RunSnapshot(RunState.ACTIVE, 3, 300, rounds_budget=4), 420, None, FinishSource.BUDGET),
        (RunSnapshot(RunState.ACTIVE, 3, 300, tokens_budget=400), 420, None, FinishSource.BUDGET),
        (RunSnapshot(RunState.ACTIVE, 3, 300, tokens_budget=500), 420, None, None),
        (RunSnapshot(RunState.ACTIVE, 3, 300), 420, "epsilon budget", FinishSource.PRIVACY),
        # a round budget reached says so, before the privacy budget
        (RunSnapshot(RunState.ACTIVE, 3, 300, rounds_budget=4), 420, "eps", FinishSource.BUDGET),
    ],
)
def test_a_budget_reached_finishes_the_run_instead_of_opening_a_round(
    run, tokens_total, privacy_stop, finish
):
    snap = snapshot(("a", S, 50.0), ("b", S, 50.0), run=run)
    screened = step(
        step(snap, RULES, Tick(), 50.0).snapshot, RULES, Screened(Screening(2, 0)), 50.0
    )
    out = step(screened.snapshot, RULES, Published(4, tokens_total, privacy_stop), 50.0)
    last = out.effects[-1]
    if finish is None:
        assert last == OpenNextRound(4, 4) and out.snapshot.run.status is RunState.ACTIVE
        return
    assert isinstance(last, FinishRun) and last.source is finish and last.finished_at == 50.0
    assert ("budget." in last.reason) is (finish is FinishSource.BUDGET)
    assert out.snapshot.run.status is RunState.FINISHED
    # a finished run's round waits for ever
    assert step(out.snapshot, RULES, Tick(), 1e9) == Step(out.snapshot, (), Decision.WAIT)


def test_events_out_of_order_are_refused():
    snap = snapshot(("a", S, 50.0), ("b", S, 50.0))
    with pytest.raises(IllegalEvent):  # not screened to close
        step(snap, RULES, Published(4, 400), 50.0)
    screened = step(snap, RULES, Screened(Screening(2, 0)), 50.0)
    with pytest.raises(IllegalEvent):  # not the version after the base
        step(screened.snapshot, RULES, Published(5, 400), 50.0)
    with pytest.raises(IllegalEvent):  # fewer tokens than the base holds
        step(screened.snapshot, RULES, Published(4, 299), 50.0)
    with pytest.raises(IllegalEvent):  # screened twice
        step(screened.snapshot, RULES, Screened(Screening(2, 0)), 50.0)
    with pytest.raises(IllegalEvent):  # a pending round has nothing to screen
        step(replace(snap, status=RoundStatus.PENDING), RULES, Screened(Screening(2, 0)), 50.0)


# ---------------------------------------------------------------------------------- properties

times = st.floats(min_value=0.0, max_value=300.0, allow_nan=False)
assignment_rows = st.lists(
    st.tuples(st.sampled_from(list(AssignmentStatus)), times), max_size=8
).map(lambda rows: tuple(AssignmentState(f"n{i}", s, t) for i, (s, t) in enumerate(rows)))
rules_st = st.builds(
    RoundRules,
    quorum=st.integers(1, 4),
    min_nodes=st.integers(1, 4),
    max_nodes=st.integers(4, 8),
    deadline_s=st.floats(1.0, 200.0),
    liveness_s=st.floats(1.0, 100.0),
)


@st.composite
def snapshots(draw) -> RoundSnapshot:
    version = draw(st.integers(0, 5))
    assignments = draw(assignment_rows)
    submitted = sum(a.status == S for a in assignments)
    return RoundSnapshot(
        run=RunSnapshot(
            status=draw(st.sampled_from(list(RunState))),
            version=version,
            tokens_total=draw(st.integers(0, 10_000)),
            rounds_budget=draw(st.none() | st.integers(1, 8)),
            tokens_budget=draw(st.none() | st.integers(1, 20_000)),
        ),
        number=version,
        base_version=version,
        status=draw(st.sampled_from(list(RoundStatus))),
        attempt=draw(st.integers(0, 3)),
        deadline_at=draw(st.none() | times),
        assignments=assignments,
        accepted=draw(st.integers(0, submitted + 2)),  # kept ones of earlier attempts too
    )


def statuses(snap: RoundSnapshot) -> dict[str, AssignmentStatus]:
    return {a.node_id: a.status for a in snap.assignments}


@settings(max_examples=examples(300), deadline=None)
@given(snapshots(), rules_st, times)
def test_a_tick_never_closes_below_quorum_and_waits_without_effects(snap, rules, now):
    out = step(snap, rules, Tick(), now)
    before, after = statuses(snap), statuses(out.snapshot)
    if out.decision is Decision.CLOSE:  # due to close: the quorum is in
        assert sum(s == S for s in after.values()) >= rules.quorum
        assert snap.status is RoundStatus.OPEN
    # a tick never closes a round nor touches the run: that takes screening and publishing
    assert out.snapshot.run == snap.run
    assert out.snapshot.status is snap.status or out.decision is Decision.REPLAN
    assert not any(isinstance(e, CloseRound | AdvanceRun | FinishRun) for e in out.effects)
    if out.decision is Decision.WAIT:
        # the only thing a waiting round does is give up the places of lost nodes
        assert all(isinstance(e, MarkMissed) for e in out.effects)
        lost = {n for e in out.effects for n in e.node_ids}
        assert {n for n in before if before[n] != after[n]} == lost
        if not lost:
            assert out.effects == () and out.snapshot == snap


@settings(max_examples=examples(300), deadline=None)
@given(snapshots(), rules_st, times)
def test_no_assignment_is_both_submitted_and_missed_by_one_step(snap, rules, now):
    out = step(snap, rules, Tick(), now)
    before, after = statuses(snap), statuses(out.snapshot)
    for node, status in before.items():
        if status != A:  # only an outstanding place moves, and only to missed
            assert after[node] == status
        else:
            assert after[node] in (A, AssignmentStatus.MISSED)
    for e in out.effects:
        if isinstance(e, MarkMissed):
            assert all(before[n] == A for n in e.node_ids)


@settings(max_examples=examples(300), deadline=None)
@given(snapshots(), rules_st, times)
def test_a_replan_keeps_the_accepted_or_returns_the_round_to_pending(snap, rules, now):
    out = step(snap, rules, Tick(), now)
    if out.decision is not Decision.REPLAN:
        return
    (replan,) = [e for e in out.effects if isinstance(e, Replan)]
    assert replan.attempt == snap.attempt + 1 == out.snapshot.attempt
    assert A not in statuses(out.snapshot).values()
    if snap.accepted == 0:
        assert replan.deadline_at is None and out.snapshot.status is RoundStatus.PENDING
    else:
        assert replan.deadline_at == now + rules.deadline_s
        assert out.snapshot.status is RoundStatus.OPEN


def arrive(snap: RoundSnapshot, uploads: int, joins: int, now: float, rules) -> RoundSnapshot:
    """What the request paths do between ticks (outside the engine): `uploads` outstanding
    places become submitted (accepted), `joins` nodes take places (a pending round opens)."""
    rows, ups = [], uploads
    for a in snap.assignments:
        if a.status == A and ups > 0:
            a, ups = replace(a, status=S, node_last_seen_at=now), ups - 1
        rows.append(a)
    if snap.status in (RoundStatus.PENDING, RoundStatus.OPEN) and joins:
        rows += [AssignmentState(f"j{now}-{k}", A, now) for k in range(joins)]
        if snap.status is RoundStatus.PENDING:
            snap = replace(snap, status=RoundStatus.OPEN, deadline_at=now + rules.deadline_s)
    return replace(snap, assignments=tuple(rows), accepted=snap.accepted + uploads - ups)


@settings(max_examples=examples(200), deadline=None)
@given(
    snapshots(),
    rules_st,
    st.lists(
        st.tuples(
            times, st.integers(0, 3), st.integers(0, 3), st.integers(0, 2), st.integers(0, 500)
        ),
        min_size=1,
        max_size=20,
    ),
)
def test_a_version_advances_exactly_once_per_close(snap, rules, moments):
    """Drive the engine as the hub does (uploads and joins arrive; Tick; if due, Screened; if
    still due, Published) at rising times: every close publishes the next version and only a
    close moves it; no step of any kind turns a submitted place into a missed one."""

    def go(before: RoundSnapshot, ev, now: float) -> Step:
        out = step(before, rules, ev, now)
        after = statuses(out.snapshot)
        for node, status in statuses(before).items():
            assert after[node] == status or (status == A and after[node] == AssignmentStatus.MISSED)
        return out

    snap = replace(snap, run=replace(snap.run, status=RunState.ACTIVE), status=RoundStatus.PENDING)
    now, closes, start = 0.0, 0, snap.run.version
    for dt, uploads, joins, rejected, tokens in moments:
        now += dt
        version = snap.run.version
        snap = arrive(snap, uploads, joins, now, rules)
        out = go(snap, Tick(), now)
        snap = out.snapshot
        if out.decision is Decision.CLOSE:
            submitted = sum(a.status == S for a in snap.assignments)
            screening = Screening(max(submitted - rejected, 0), min(rejected, submitted))
            out = go(snap, Screened(screening), now)
            snap = out.snapshot
        if out.decision is Decision.CLOSE:
            out = go(snap, Published(version + 1, snap.run.tokens_total + tokens), now)
            closes += 1
            assert sum(isinstance(e, AdvanceRun) for e in out.effects) == 1
            assert out.snapshot.run.version == version + 1
            snap = out.snapshot
            opened = [e for e in out.effects if isinstance(e, OpenNextRound)]
            if not opened:
                assert snap.run.status is RunState.FINISHED
                break
            snap = RoundSnapshot(  # the hub's next round: pending, from the new version
                run=snap.run,
                number=opened[0].number,
                base_version=opened[0].base_version,
                status=RoundStatus.PENDING,
                attempt=0,
                deadline_at=None,
            )
        else:
            assert snap.run.version == version  # no close, no new version
    assert snap.run.version == start + closes
    event(f"closes: {min(closes, 3)}")


def summary(snap: RoundSnapshot, silent_before: float) -> RoundSnapshot:
    """`snap` as hub/store/rounds.py reads it at scale: the assignments counted by status, and
    only the outstanding ones of nodes silent since `silent_before` listed."""
    return replace(
        snap,
        assignments=tuple(
            a
            for a in snap.assignments
            if a.status == AssignmentStatus.ASSIGNED and a.node_last_seen_at < silent_before
        ),
        outstanding=sum(a.status == AssignmentStatus.ASSIGNED for a in snap.assignments),
        submitted=sum(a.status == AssignmentStatus.SUBMITTED for a in snap.assignments),
    )


@settings(max_examples=examples(300), deadline=None)
@given(snapshots(), rules_st, times, st.integers(0, 3))
def test_a_summary_snapshot_steps_as_the_full_one(snap, rules, now, publish_after):
    """A tick (and what follows it) decides the same from the summary read as from every
    row: the same decision and effects, whatever the rows."""
    full, short = snap, summary(snap, now - rules.liveness_s + 1.0)  # as the hub reads it
    a, b = step(full, rules, Tick(), now), step(short, rules, Tick(), now)
    assert (a.decision, a.effects) == (b.decision, b.effects)
    assert a.snapshot.round_state().n_outstanding == b.snapshot.round_state().n_outstanding
    if a.decision is Decision.CLOSE and publish_after:
        screening = Screening(accepted=max(rules.quorum, a.snapshot.accepted), rejected=0)
        a = step(a.snapshot, rules, Screened(screening), now)
        b = step(b.snapshot, rules, Screened(screening), now)
        assert (a.decision, a.effects) == (b.decision, b.effects)


# ------------------------------------------------------------------- node events: asks


PLAN = PlanRules(tokens_per_step=16, inner_steps=4, min_inner_steps=1)
FULL_SPEED = WorkFacts(1000.0, 1000.0, share=1.0, window_s=None, retry_after_s=30.0)


def ask(node_id: str, has_seat=False, taken=0, live=3, admission=None, work=FULL_SPEED) -> Asked:
    return Asked(node_id, SeatFacts(has_seat, taken, live), PLAN, admission, work)


def test_the_first_ask_opens_a_pending_round_and_assigns_the_full_plan():
    pending = snapshot(status=RoundStatus.PENDING, deadline_at=None, attempt=1)
    out = step(pending, RULES, ask("a"), 10.0)
    assert out.wait is None and out.decision is Decision.WAIT
    assert out.effects == (
        OpenRound(opened_at=10.0, deadline_at=70.0),
        Assign("a", attempt=1, base_version=3, inner_steps=4, created_at=10.0, deadline_at=70.0),
    )
    assert out.snapshot.status is RoundStatus.OPEN and out.snapshot.deadline_at == 70.0
    assert statuses(out.snapshot) == {"a": A}
    # the next ask joins the open round by its deadline; a slower node gets fewer steps
    slow = replace(FULL_SPEED, tokens_per_s=500.0)
    out = step(out.snapshot, RULES, ask("b", taken=1, work=slow), 20.0)
    assert out.effects == (Assign("b", 1, 3, inner_steps=2, created_at=20.0, deadline_at=70.0),)


@pytest.mark.parametrize(
    ("asked", "status", "cause"),
    [
        (ask("a", taken=4), RoundStatus.OPEN, "round is full"),
        (ask("a", has_seat=True, taken=1), RoundStatus.OPEN, "already assigned this round"),
        (ask("a", live=1), RoundStatus.PENDING, "waiting for 2 live nodes (1 now)"),
        (ask("a", taken=1), RoundStatus.CLOSED, "round closed"),
        (ask("a", admission="others go first", work=None), RoundStatus.OPEN, "others go first"),
    ],
)
def test_an_ask_without_a_place_waits_for_the_round_to_change(asked, status, cause):
    snap = snapshot(status=status)
    assert seat_refusal(snap, RULES, asked.seat) == (None if asked.admission else cause)
    out = step(snap, RULES, asked, 10.0)
    assert out.effects == () and out.snapshot == snap
    assert out.wait == AskWait(1.0, None, cause=cause)  # only a change of round helps


def test_the_energy_share_and_the_deadline_bound_the_plan():
    snap = snapshot()  # open, deadline at t=100
    no_share = replace(FULL_SPEED, share=0.0)
    assert step(snap, RULES, ask("a", work=no_share), 10.0).wait == AskWait(
        30.0, 30.0, cause="the run's energy policy gives this node no work now"
    )
    half = replace(FULL_SPEED, share=0.5)
    assert step(snap, RULES, ask("a", work=half), 10.0).effects[0].inner_steps == 2
    # one step takes 0.016 s: 7 s (the reserve) before the deadline nothing fits any more
    late = step(snap, RULES, ask("a"), 93.5)
    assert late.effects == () and late.wait.retry_after_s == late.wait.changes_after_s == 2.0
    # the node's own energy window (here 0 s, plus the reserve) shortens its plan the same way
    window = replace(FULL_SPEED, tokens_per_s=1.0, fastest_tokens_per_s=1.0, window_s=0.0)
    assert step(snap, RULES, ask("a", work=window), 10.0).wait.retry_after_s == 2.0
    with pytest.raises(IllegalEvent):  # a node let in needs its work facts
        step(snap, RULES, ask("a", work=None), 10.0)


def test_a_run_not_active_or_a_secagg_round_answers_every_ask_alike():
    paused = snapshot(run=RunSnapshot(RunState.PAUSED, 3, 300, id="r1", status_reason="sponsor"))
    assert (
        run_wait(paused.run)
        == round_wait(paused)
        == AskWait(5.0, 5.0, "run r1 is paused: sponsor", cause="run r1 is paused: sponsor")
    )
    done = snapshot(run=RunSnapshot(RunState.FINISHED, 3, 300, id="r1"))
    out = step(done, RULES, ask("a"), 10.0)
    assert out.wait.finished and out.wait.changes_after_s is None and out.effects == ()
    secagg = snapshot(status=RoundStatus.SECAGG)
    assert run_wait(secagg.run) is None
    assert step(secagg, RULES, ask("a"), 10.0).wait.changes_after_s == 1.0


# ----------------------------------------------------------------- node events: uploads

CLAIM_RULES = ClaimRules("int8", tokens_per_step=16, batch_size=2, energy_min_fraction=0.0)
NO_ENERGY = EnergyFacts(w_per_core=10.0, fastest_tokens_per_s=None)
ROW = ContributionRow("d" * 64, {"steps": 4}, bytes_up=100, columns={"carbon_g": 0.1})


def upload(node_id="a", status=A, round_=3, steps=4, rules=CLAIM_RULES) -> Arrived:
    claim = ClaimFacts("int8", steps, steps * 16, 1.0, 1, None, None)
    place = AssignmentFacts(status, round_, inner_steps=4)
    return Arrived(f"as-{node_id}", node_id, place, claim, ROW, rules, NO_ENERGY)


def test_an_upload_the_round_wants_is_recorded_and_submitted():
    snap = snapshot(("a", A, 10.0), ("b", S, 10.0))
    out = step(snap, RULES, upload("a"), 20.0)
    assert out.refused is None and out.wait is None
    assert out.effects == (RecordContribution("as-a", ROW, 20.0), MarkSubmitted("as-a"))
    assert statuses(out.snapshot) == {"a": S, "b": S} and out.snapshot.accepted == 2
    # its retry (a lost acknowledgement): a duplicate, nothing written again
    again = step(out.snapshot, RULES, upload("a", status=S), 21.0)
    assert again.effects == () and again.refused.reason is Refusal.DUPLICATE
    assert again.snapshot.accepted == 2


def test_a_late_or_false_upload_is_refused_typed():
    snap = snapshot(("a", A, 10.0))
    late = step(snap, RULES, upload("a", round_=2), 20.0)  # its round moved on
    assert late.refused.reason is Refusal.STALE and late.refused.mark_late
    assert late.effects == (MarkLate("as-a"),) and late.snapshot == snap
    for gone in (AssignmentStatus.RELEASED, AssignmentStatus.MISSED):
        out = step(snap, RULES, upload("a", status=gone), 20.0)
        assert out.refused.reason is Refusal.STALE and out.effects == ()
    false = step(snap, RULES, upload("a", steps=3), 20.0)
    assert false.refused.reason is Refusal.FALSE_CLAIM and false.refused.strike
    assert false.effects == () and false.snapshot == snap
    secagg_rules = replace(CLAIM_RULES, expected_codec="secagg")
    assert step(snap, RULES, upload(rules=secagg_rules), 20.0).refused.reason is Refusal.MALFORMED
    assert place_refusal(snap, upload("a").place) is None
    with pytest.raises(IllegalEvent):  # an upload the round wants needs its claim rules
        step(snap, RULES, upload("a", rules=None), 20.0)
    # a stale upload is refused before its claims are read (the caller reads none)
    stopped = replace(snap, run=replace(snap.run, status=RunState.STOPPED))
    assert step(stopped, RULES, upload("a", rules=None), 20.0).refused.reason is Refusal.STALE


# ------------------------------------------------------------------- node events: leaves


def test_a_node_that_leaves_gives_up_its_outstanding_place_only():
    snap = snapshot(("a", A, 10.0), ("b", S, 10.0), ("c", A, 10.0))
    out = step(snap, RULES, Left(("a", "b", "a")), 20.0)
    assert out.effects == (ReleaseOutstanding(("a", "b")),) == left_effects(Left(("a", "b", "a")))
    assert statuses(out.snapshot) == {"a": AssignmentStatus.RELEASED, "b": S, "c": A}
    assert left_effects(Left(())) == ()
    # a released place takes no upload any more
    released = replace(upload("a").place, status=AssignmentStatus.RELEASED)
    assert place_refusal(out.snapshot, released).reason is Refusal.STALE


# -------------------------------------------------------------- node events: properties


@st.composite
def node_events(draw) -> list[tuple[str, int]]:
    kinds = st.sampled_from(["work", "work", "ask", "upload", "leave", "tick", "close"])
    return draw(st.lists(st.tuples(kinds, st.integers(0, 5)), min_size=1, max_size=40))


class Rows:
    """Assignment rows in a dict, changed by the effects as hub/store/rounds.py changes the
    tables (the store the property below drives the engine with)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}  # assignment id -> node, round, status, steps
        self.recorded: list[str] = []  # assignment ids with a recorded contribution

    def of_round(self, number: int) -> list[dict]:
        return [r for r in self.rows.values() if r["round"] == number]

    def apply(self, number: int, effects) -> None:
        for e in effects:
            if isinstance(e, Assign):
                row = {"node": e.node_id, "round": number, "status": A, "steps": e.inner_steps}
                self.rows[f"a{len(self.rows)}"] = row
            elif isinstance(e, RecordContribution):
                assert self.rows[e.assignment_id]["status"] == A
                self.recorded.append(e.assignment_id)
            elif isinstance(e, MarkSubmitted | MarkLate):
                assert self.rows[e.assignment_id]["status"] == A
                late = isinstance(e, MarkLate)
                self.rows[e.assignment_id]["status"] = AssignmentStatus.LATE if late else S
            elif isinstance(e, ReleaseOutstanding):
                for r in self.rows.values():
                    if r["node"] in e.node_ids and r["status"] == A:
                        r["status"] = AssignmentStatus.RELEASED
            elif isinstance(e, MarkMissed | MissOutstanding):
                for r in self.of_round(number):
                    hit = isinstance(e, MissOutstanding) or r["node"] in e.node_ids
                    if r["status"] == A and hit:
                        r["status"] = AssignmentStatus.MISSED


# rounds smaller than the swarm, so that they fill up
small_rules = st.builds(
    RoundRules,
    quorum=st.integers(1, 3),
    min_nodes=st.integers(1, 3),
    max_nodes=st.integers(1, 4),
    deadline_s=st.floats(1.0, 200.0),
    liveness_s=st.floats(1.0, 100.0),
)


@settings(max_examples=examples(200), deadline=None)
@given(small_rules, node_events(), st.integers(3, 6))
def test_node_events_keep_the_round_invariants(rules, events, n_nodes):
    """Drive asks, uploads (fresh, repeated, late), leaves, ticks and closes through `step`,
    with the effects applied to rows as the store applies them. Whatever the order: an
    acknowledged contribution is recorded, and counted, once; a round never holds more places
    than `max_nodes`; no assignment is both released and submitted."""
    store = Rows()
    snap = snapshot(status=RoundStatus.PENDING, deadline_at=None, accepted=0)
    # "work": an ask, then at once its upload (so that rounds fill and close often)
    moves = [
        (k, i) for kind, i in events for k in (["ask", "upload"] if kind == "work" else [kind])
    ]
    for t, (kind, i) in enumerate(moves):
        now, node = float(t + 1), f"n{i % n_nodes}"
        rows = store.of_round(snap.number)  # the snapshot the store reads: the round's rows
        snap = replace(
            snap, assignments=tuple(AssignmentState(r["node"], r["status"], now) for r in rows)
        )
        if kind == "ask":
            held = {r["node"] for r in rows if r["status"] in (A, S)}
            seat = SeatFacts(node in held, len(held), n_nodes)
            out = step(snap, rules, Asked(node, seat, PLAN, None, FULL_SPEED), now)
        elif kind == "upload":
            mine = [aid for aid, r in store.rows.items() if r["node"] == node]
            if not mine:
                continue
            r = store.rows[mine[-1]]
            claim = ClaimFacts("int8", r["steps"], r["steps"] * 16, 1.0, 1, None, None)
            place = AssignmentFacts(r["status"], r["round"], r["steps"])
            ev = Arrived(mine[-1], node, place, claim, ROW, CLAIM_RULES, NO_ENERGY)
            out = step(snap, rules, ev, now)
        elif kind == "leave":
            out = step(snap, rules, Left((node,)), now)
        elif kind == "tick":
            out = step(snap, rules, Tick(), now + rules.deadline_s * (i % 2))
        else:  # the hub's close: screened and published, if due
            out = step(snap, rules, Tick(), now)
            if out.decision is Decision.CLOSE:
                store.apply(snap.number, out.effects)
                snap = out.snapshot
                screening = Screening(sum(a.status == S for a in snap.assignments), 0)
                out = step(snap, rules, Screened(screening), now)
                if out.decision is Decision.CLOSE:
                    published = Published(snap.run.version + 1, snap.run.tokens_total + 1)
                    out = step(out.snapshot, rules, published, now)
        store.apply(snap.number, out.effects)
        snap = out.snapshot
        for opened in (e for e in out.effects if isinstance(e, OpenNextRound)):
            snap = RoundSnapshot(
                snap.run, opened.number, opened.base_version, RoundStatus.PENDING, 0, None
            )
        # the invariants, after every event
        assert len(store.recorded) == len(set(store.recorded)), "recorded twice"
        in_round = [aid for aid in store.recorded if store.rows[aid]["round"] == snap.number]
        assert snap.accepted == len(in_round), "an accepted contribution counted other than once"
        for number in {r["round"] for r in store.rows.values()}:
            held = [r for r in store.of_round(number) if r["status"] in (A, S)]
            assert len(held) <= rules.max_nodes, "more places held than max_nodes"
        for aid in store.recorded:  # submitted, and never released (nor anything else) after
            assert store.rows[aid]["status"] == S
    event(f"recorded: {min(len(store.recorded), 5)}+")
    event(f"rounds closed: {min(snap.number - 3, 2)}+")


# -------------------------------------------------------------------------------------- SecAgg

SECAGG_RULES = replace(RULES, secagg_stage_timeout_s=30.0)
D = AssignmentStatus.DISCARDED


def in_secagg(stage: str = "share", **kw) -> RoundSnapshot:
    """Round 3 of a SecAgg run in its secure aggregation at `stage`: a, b, c, d advertised."""
    fields = {"status": RoundStatus.SECAGG, "secagg_stage": stage} | kw
    return snapshot(("a", S, 50.0), ("b", S, 50.0), ("c", S, 50.0), ("d", S, 50.0), **fields)


def progress(stage: str, answered: str, expected="abcd", lost="", t=1) -> SecAggProgress:
    """Stage `stage` of four participants tolerating `t` dropouts, due at t=130."""
    return SecAggProgress(
        StageProgress(stage, 4, t, frozenset(expected), frozenset(answered), frozenset(lost), 130.0)
    )


def test_a_secagg_tick_that_would_close_opens_the_secure_aggregation():
    snap = snapshot(("a", S, 50.0), ("b", S, 50.0), ("c", A, 50.0), deadline_at=60.0)
    plain = step(snap, RULES, Tick(), 60.0)
    assert plain.decision is Decision.CLOSE  # without SecAgg: screened next
    out = step(snap, SECAGG_RULES, Tick(), 60.0)
    assert out.decision is Decision.WAIT
    assert out.effects == (
        MissOutstanding(),
        OpenSecAgg(attempt=0, opened_at=60.0, stage_deadline_at=90.0),
    )
    assert out.snapshot.status is RoundStatus.SECAGG and out.snapshot.secagg_stage == "share"
    assert statuses(out.snapshot) == {"a": S, "b": S, "c": AssignmentStatus.MISSED}
    # a round in its secure aggregation takes no more ticks' decisions (nor asks: round_wait)
    assert step(out.snapshot, SECAGG_RULES, Tick(), 200.0) == Step(out.snapshot, (), Decision.WAIT)
    # a re-plan is a re-plan in a SecAgg run too
    short = snapshot(("a", S, 99.0), ("b", A, 99.0))
    assert step(short, SECAGG_RULES, Tick(), 100.0).effects[-1] == Replan(1, 160.0)


@pytest.mark.parametrize("stage", ["share", "mask"])
def test_a_stage_everyone_answered_moves_on_with_a_fresh_timeout(stage):
    snap = in_secagg(stage)
    waiting = step(snap, SECAGG_RULES, progress(stage, "abc"), 100.0)
    assert waiting == Step(snap, (), Decision.WAIT)
    out = step(snap, SECAGG_RULES, progress(stage, "abcd"), 100.0)
    assert out.effects == (AdvanceStage(NEXT_STAGE[stage], 130.0),)
    assert out.decision is Decision.WAIT and not out.unmask
    assert out.snapshot.secagg_stage == NEXT_STAGE[stage]
    # within t a lost node (or the stage timeout) does not hold the stage
    lost = step(snap, SECAGG_RULES, progress(stage, "abc", lost="d"), 100.0)
    assert lost.effects == (AdvanceStage(NEXT_STAGE[stage], 130.0),)
    late = step(snap, SECAGG_RULES, progress(stage, "abc"), 130.0)
    assert late.effects == (AdvanceStage(NEXT_STAGE[stage], 160.0),)


@pytest.mark.parametrize("stage", ["share", "mask", "unmask"])
def test_more_than_t_dropouts_at_any_stage_discard_the_attempt_and_retrain(stage):
    snap = in_secagg(stage, attempt=2, deadline_at=60.0)
    out = step(snap, SECAGG_RULES, progress(stage, "ab", lost="cd"), 100.0)
    (fail, replan) = out.effects
    assert isinstance(fail, FailSecAgg) and fail.failed_at == 100.0
    assert f"at the {stage} stage: 2 of 4 nodes dropped out" in fail.reason
    assert replan == Replan(attempt=3, deadline_at=None)
    assert out.decision is Decision.REPLAN and not out.unmask  # waiting nodes are woken
    after = out.snapshot
    assert (after.status, after.attempt, after.deadline_at) == (RoundStatus.PENDING, 3, None)
    assert after.accepted == 0 and set(statuses(after).values()) == {D}
    assert after.secagg_stage is None
    # the same at the timeout with more than t missing
    timed_out = step(snap, SECAGG_RULES, progress(stage, "ab"), 130.0)
    assert isinstance(timed_out.effects[0], FailSecAgg)


def test_the_unmask_stage_asks_for_the_unmask_then_closes_on_the_recovered_sum():
    snap = in_secagg("unmask", accepted=4)
    out = step(snap, SECAGG_RULES, progress("unmask", "abc", expected="abc"), 100.0)
    assert out == Step(snap, (), Decision.WAIT, unmask=True)  # the caller unmasks now
    recovered = step(snap, SECAGG_RULES, SecAggRecovered(("c", "a", "b"), ("d",)), 100.0)
    assert recovered.effects == (FinishSecAgg(("a", "b", "c"), 1, 100.0),)
    assert recovered.decision is Decision.CLOSE  # screened and published next
    assert recovered.snapshot.secagg_stage == "done" and recovered.snapshot.accepted == 3
    screened = step(recovered.snapshot, SECAGG_RULES, Screened(Screening(3, 0, 1)), 100.0)
    assert screened.decision is Decision.CLOSE
    published = step(screened.snapshot, SECAGG_RULES, Published(4, 400), 100.0)
    assert published.snapshot.status is RoundStatus.CLOSED


def test_an_unmask_that_fails_retrains_the_round_as_a_failed_stage_does():
    snap = in_secagg("unmask", attempt=1)
    out = step(snap, SECAGG_RULES, SecAggFailed("bad share"), 100.0)
    assert out.effects == (
        FailSecAgg("secure aggregation failed to unmask: bad share", 100.0),
        Replan(attempt=2, deadline_at=None),
    )
    assert out.snapshot.status is RoundStatus.PENDING and out.decision is Decision.REPLAN


def test_secagg_events_the_round_cannot_take_are_the_callers_bug():
    with pytest.raises(IllegalEvent):  # not in its secure aggregation
        step(snapshot(), SECAGG_RULES, progress("share", "abcd"), 100.0)
    with pytest.raises(IllegalEvent):  # the session is at another stage
        step(in_secagg("mask"), SECAGG_RULES, progress("share", "abcd"), 100.0)
    with pytest.raises(IllegalEvent):  # no sum before the unmask stage
        step(in_secagg("mask"), SECAGG_RULES, SecAggRecovered(("a",), ()), 100.0)
    with pytest.raises(IllegalEvent):
        step(in_secagg("share"), SECAGG_RULES, SecAggFailed("x"), 100.0)
    with pytest.raises(IllegalEvent):  # a node both in the sum and dropped
        step(in_secagg("unmask"), SECAGG_RULES, SecAggRecovered(("a",), ("a",)), 100.0)
    with pytest.raises(IllegalEvent):  # a run without SecAgg has no stages
        step(in_secagg("share"), RULES, progress("share", "abcd"), 100.0)


node_sets = st.frozensets(st.sampled_from("abcdef"), max_size=6)


@settings(max_examples=examples(300), deadline=None)
@given(
    snapshots(),
    st.sampled_from(["share", "mask", "unmask"]),
    node_sets,
    node_sets,
    node_sets,
    st.integers(0, 3),
    times,
)
def test_a_stage_step_fails_into_a_pending_retrain_or_keeps_the_round_in_secagg(
    snap, stage, expected, answered, lost, t, now
):
    """Whatever the stage's facts: a failure returns the round to pending as attempt + 1 with
    no accepted contribution and no place held; anything else leaves the round in its secure
    aggregation (the stage moved on by at most one), its work untouched, and never closes it."""
    snap = replace(snap, status=RoundStatus.SECAGG, secagg_stage=stage, screening=None)
    p = StageProgress(stage, 6, t, expected, answered & expected, lost & expected, 100.0)
    out = step(snap, SECAGG_RULES, SecAggProgress(p), now)
    failed = any(isinstance(e, FailSecAgg) for e in out.effects)
    assert out.decision is (Decision.REPLAN if failed else Decision.WAIT)
    if failed:
        event("failed")
        assert out.effects[-1] == Replan(snap.attempt + 1, None)
        after = out.snapshot
        assert (after.status, after.attempt, after.accepted) == (
            RoundStatus.PENDING,
            snap.attempt + 1,
            0,
        )
        assert not {S, A} & set(statuses(after).values())
        assert not out.unmask
    else:
        event("unmask" if out.unmask else "advanced" if out.effects else "waits")
        assert out.snapshot.status is RoundStatus.SECAGG
        assert out.snapshot.assignments == snap.assignments
        assert out.snapshot.accepted == snap.accepted
        assert out.snapshot.secagg_stage in {stage, NEXT_STAGE[stage]}
        assert not out.unmask or (stage == "unmask" and not out.effects)
