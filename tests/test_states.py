"""The typed statuses (hub/states.py, issue 9): the groups the hub asks about are consistent,
and every status the real hub writes in an in-process run is a member of its enum (the enums
list every state the code can store; a new bare string would fail here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session

from gridswarm.hub import models as m
from gridswarm.hub.lifecycle import FINAL, NOT_ENDED, RunState
from gridswarm.hub.states import (
    ASSIGNMENT_FINAL,
    ASSIGNMENT_MOVES,
    ASSIGNMENT_START,
    CONTRIBUTION_MOVES,
    CONTRIBUTION_START,
    COUNTS_FOR_QUORUM,
    HOLDS_PLACE,
    NOT_IN_SUM,
    ROUND_FINAL,
    ROUND_MOVES,
    ROUND_START,
    AssignmentStatus,
    ContributionStatus,
    IllegalMove,
    RoundStatus,
)
from gridswarm.identity import Identity
from gridswarm.protocol import API, HeartbeatRequest, NodeStatus, Refusal
from tests.harness import GOLDEN_RUN, assert_statuses_typed, run_golden
from tests.hub.harness import Hub


def test_groups_are_consistent():
    # an assignment either holds a place in its round or is final, never both
    assert HOLDS_PLACE.isdisjoint(ASSIGNMENT_FINAL)
    assert set(AssignmentStatus) == HOLDS_PLACE | ASSIGNMENT_FINAL
    assert AssignmentStatus.ASSIGNED in HOLDS_PLACE  # the only state an upload is taken in
    # the quorum counts no contribution that never reached the sum, except SecAgg dropouts
    assert {ContributionStatus.ACCEPTED} == COUNTS_FOR_QUORUM - NOT_IN_SUM
    assert ContributionStatus.REJECTED not in COUNTS_FOR_QUORUM | NOT_IN_SUM
    assert ContributionStatus.ACCEPTED not in NOT_IN_SUM
    assert {RoundStatus.CLOSED} == ROUND_FINAL
    assert NOT_ENDED.isdisjoint(FINAL) and set(RunState) == NOT_ENDED | FINAL


def test_members_store_as_their_plain_words():
    """No migration: a member is its string, compares and hashes like it."""
    for enum in (RoundStatus, AssignmentStatus, ContributionStatus, NodeStatus):
        for member in enum:
            assert member == member.value and f"{member}" == member.value
            assert {member.value: 1}[member] == 1
            assert len(member.value) <= 16  # the status columns are String(16)
    # the words shared by two machines mean the same kind of end in both
    assert AssignmentStatus.REJECTED == ContributionStatus.REJECTED == "rejected"
    assert AssignmentStatus.DISCARDED == ContributionStatus.DISCARDED == "discarded"


def test_every_status_an_in_process_run_stores_is_typed(tmp_path: Path):
    # the golden run cut to 2 rounds: it stores the same statuses as all 6 (at a quarter of the CPU)
    result = run_golden(tmp_path, config={**GOLDEN_RUN, "budget": {"rounds": 2}}, max_steps=400)
    assert result["status"] == "finished"
    engine = create_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    stored = assert_statuses_typed(engine)
    # the ORM reads each status back as its enum member (models.Status), not a bare string
    with Session(engine) as s:
        for table, enum in (
            (m.Run, RunState),
            (m.Round, RoundStatus),
            (m.Assignment, AssignmentStatus),
            (m.Contribution, ContributionStatus),
            (m.Node, NodeStatus),
        ):
            rows = s.scalars(select(table)).all()
            assert rows and all(type(r.status) is enum for r in rows), table.__tablename__
        # and refuses to write a word that is no member: nothing unknown reaches the table,
        # neither through the model (its validator) nor through a bulk UPDATE (the column type)
        a = s.scalars(select(m.Assignment)).first()
        with pytest.raises(ValueError, match="'lost' is not a valid AssignmentStatus"):
            a.status = "lost"
        with pytest.raises(StatementError, match="'lost' is not a valid AssignmentStatus"):
            s.execute(update(m.Assignment).values(status="lost"))
    assert stored["runs"] == {"finished"}
    assert RoundStatus.CLOSED in stored["rounds"]
    assert AssignmentStatus.SUBMITTED in stored["assignments"]
    assert stored["contributions"] <= {"accepted", "rejected"}


def test_a_heartbeat_reports_a_node_status_but_never_sets_left(tmp_path: Path):
    """`left` is the hub's to set (POST /nodes/leave): a heartbeat saying it is refused and
    changes nothing; a reportable status is stored as its member."""
    assert set(HeartbeatRequest.model_json_schema()["properties"]["status"]["enum"]) == {
        s.value for s in NodeStatus if s is not NodeStatus.LEFT
    }
    hub = Hub(tmp_path)
    node = Identity.generate()
    hub.register(node)
    r = hub.post(node, f"{API}/nodes/heartbeat", {"status": "left"})
    assert r.status_code == 422 and r.json()["reason"] == Refusal.MALFORMED, r.text
    assert hub.post(node, f"{API}/nodes/heartbeat", {"status": "paused"}).status_code == 200
    with hub.service.sessions() as s:
        hub.service.membership.flush_heartbeats(s)
        s.commit()
        row = s.get(m.Node, node.node_id)
        assert row.status is NodeStatus.PAUSED


def test_the_transition_tables_match_the_groups():
    """Final states have no way out, a place-holding assignment only ends, and every status is
    reachable from where its row starts."""
    for moves, start in (
        (ROUND_MOVES, ROUND_START),
        (ASSIGNMENT_MOVES, ASSIGNMENT_START),
        (CONTRIBUTION_MOVES, CONTRIBUTION_START),
    ):
        assert set(moves) == set(type(next(iter(start))))
        seen, frontier = set(start), list(start)
        while frontier:
            for nxt in moves[frontier.pop()] - seen:
                seen.add(nxt)
                frontier.append(nxt)
        assert seen == set(moves)
    assert all(not ASSIGNMENT_MOVES[s] for s in ASSIGNMENT_FINAL)
    assert not ROUND_MOVES[RoundStatus.CLOSED]
    # the hub's bulk UPDATEs (they bypass the ORM validators): source statuses in their WHERE
    bulk = [
        (ASSIGNMENT_MOVES, {AssignmentStatus.ASSIGNED}, AssignmentStatus.MISSED),
        (ASSIGNMENT_MOVES, {AssignmentStatus.ASSIGNED}, AssignmentStatus.RELEASED),
        (ASSIGNMENT_MOVES, HOLDS_PLACE, AssignmentStatus.DISCARDED),
        (
            CONTRIBUTION_MOVES,
            set(ContributionStatus) - {ContributionStatus.DISCARDED},
            ContributionStatus.DISCARDED,
        ),
    ]
    for moves, sources, target in bulk:
        assert all(target in moves[s] for s in sources), (sources, target)


def test_an_illegal_move_raises_before_anything_is_stored(tmp_path: Path):
    """Every ORM status write goes through its lifecycle's table (models' validators)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    m.Base.metadata.create_all(engine)
    with pytest.raises(IllegalMove, match="round: \\(new\\) -> closed"):
        m.Round(run_id="r", number=0, base_version=0, status=RoundStatus.CLOSED)
    rnd = m.Round(run_id="r", number=0, base_version=0, status=RoundStatus.PENDING)
    rnd.status = RoundStatus.OPEN
    rnd.status = RoundStatus.OPEN  # the same status again is no move
    rnd.status = RoundStatus.CLOSED
    with pytest.raises(IllegalMove, match="round: closed -> open"):
        rnd.status = RoundStatus.OPEN
    assert rnd.status == RoundStatus.CLOSED
    a = m.Assignment(id="a", status=AssignmentStatus.ASSIGNED)
    a.status = AssignmentStatus.SUBMITTED
    with pytest.raises(IllegalMove):
        a.status = AssignmentStatus.MISSED  # an accepted upload is never "missed"
    c = m.Contribution(id="c", status=ContributionStatus.ACCEPTED)
    c.status = ContributionStatus.REJECTED
    with pytest.raises(IllegalMove):
        c.status = ContributionStatus.ACCEPTED
    with pytest.raises(ValueError):
        c.status = "approved"  # not a member of its enum at all
