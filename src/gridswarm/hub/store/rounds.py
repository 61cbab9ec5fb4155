"""The one place the round engine's effects (`hub/engine.py`) become SQL.

`apply_effects` turns each effect into its UPDATE or INSERT on the caller's session, in order,
without committing: the caller holds the run's row lock and commits the effects together with
whatever heavy work preceded them (the version row and the settlement of a close; the trust
ledger's entries of an opened round or a recorded contribution), so that an event's effects are
stored in one transaction or not at all.

Two views feed the engine: `read_snapshot` (the round's rows and counts, what a tick or a close
decides on) and `row_snapshot` (the run's and round's rows the caller already holds, no query:
what an ask or an upload decides on, with its counts carried in the event).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from gridswarm.hub import models as m
from gridswarm.hub.engine import (
    AdvanceRun,
    AdvanceStage,
    Assign,
    CloseRound,
    Effect,
    FailSecAgg,
    FinishRun,
    FinishSecAgg,
    FinishSource,
    IllegalEvent,
    MarkLate,
    MarkMissed,
    MarkSubmitted,
    MissOutstanding,
    OpenNextRound,
    OpenRound,
    OpenSecAgg,
    RecordContribution,
    ReleaseOutstanding,
    Replan,
    RoundSnapshot,
    RunSnapshot,
)
from gridswarm.hub.lifecycle import RunEvent, RunState, transition
from gridswarm.hub.rounds import AssignmentState
from gridswarm.hub.secagg_stages import NEXT_STAGE
from gridswarm.hub.states import (
    ASSIGNMENT_MOVES,
    ASSIGNMENT_START,
    HOLDS_PLACE,
    AssignmentStatus,
    ContributionStatus,
    RoundStatus,
    checked_move,
)

# a failed SecAgg attempt discards every contribution of its round (all attempts') not yet so
DISCARDABLE = frozenset(ContributionStatus) - {ContributionStatus.DISCARDED}

# an upload's two writes, as Core statements built once: executed at once on the session's
# connection, not through the ORM's unit of work (whose flush cost more than the two statements
# themselves on every upload; bench/results/hub_request_cost_upload.md)
_CONTRIBUTIONS = m.Contribution.__table__
_CONTRIBUTION_COLUMNS = tuple(c.key for c in _CONTRIBUTIONS.columns)
_INSERT_CONTRIBUTION = insert(_CONTRIBUTIONS)
_ASSIGNMENTS = m.Assignment.__table__
_MOVE_OUTSTANDING = (
    update(_ASSIGNMENTS)
    .where(
        _ASSIGNMENTS.c.id == bindparam("assignment_id"),
        _ASSIGNMENTS.c.status == AssignmentStatus.ASSIGNED,
    )
    .values(status=bindparam("to", type_=_ASSIGNMENTS.c.status.type))
)


@dataclass
class Applied:
    """The rows `apply_effects` created (an Assign's assignment, a RecordContribution's
    contribution: what the caller answers with, or puts on the ledger) and how many
    assignments a ReleaseOutstanding released."""

    assignments: list[m.Assignment] = field(default_factory=list)
    contributions: list[m.Contribution] = field(default_factory=list)
    released: int = 0


def apply_effects(
    s: Session,
    run: m.Run | None,
    rnd: m.Round | None,
    effects: Iterable[Effect],
    secagg_config: str | None = None,
    contribution_columns: Mapping[str, Any] | None = None,
) -> Applied:
    """Write `effects` of one engine step on `run`'s round `rnd` (both loaded in `s`, the run's
    row locked). Bulk UPDATEs name their source status, so a row that moved meanwhile is left
    alone (tests/hub/test_states.py checks each move against `hub/states.py`); so do the moves
    of one assignment, which is loaded in `s` already (its upload's batch read it). A
    ReleaseOutstanding spans runs: it alone may come with `run` and `rnd` None (a node
    leaving, the caller holding the locks of the runs it works in). `secagg_config`: the
    encoded `SecAggConfig` an OpenSecAgg's session holds (the caller's crypto, hub/privacy.py
    `HubPrivacy.session_config`); the SecAgg effects write the session row's status columns,
    never its messages or blobs. `contribution_columns`: a RecordContribution's columns that
    the hub learnt after the engine decided (the update's digest, the ledger seq of the node's
    claim: `HubTrust.record_submission`), stored with its row.

    An upload's effects (RecordContribution, MarkSubmitted or MarkLate) are written at once,
    by Core statements on the session's connection, not left to the ORM's flush: the row is
    built as the ORM object `Contribution.accepted` (its status checked on creation) and
    returned with `applied`, detached; the assignment's move is checked (`checked_move`), it
    names its source status, and the loaded row is given its new status as committed."""
    applied = Applied()
    conn = None  # the session's connection, for an upload's Core statements (looked up once)
    for effect in effects:
        if isinstance(effect, ReleaseOutstanding):
            if effect.node_ids:
                applied.released += s.execute(
                    update(m.Assignment)
                    .where(
                        m.Assignment.node_id.in_(effect.node_ids),
                        m.Assignment.status == AssignmentStatus.ASSIGNED,
                    )
                    .values(status=AssignmentStatus.RELEASED)
                ).rowcount
            continue
        if run is None or rnd is None:
            raise IllegalEvent(f"{effect!r} is a round's effect: it needs the run and round")
        if isinstance(effect, OpenRound):
            if rnd.status != RoundStatus.PENDING:
                raise IllegalEvent(f"round {rnd.number} is {rnd.status}: it cannot open")
            rnd.status = RoundStatus.OPEN
            rnd.opened_at, rnd.deadline_at = effect.opened_at, effect.deadline_at
        elif isinstance(effect, Assign):
            row = m.Assignment(
                id=uuid.uuid4().hex,
                run_id=run.id,
                round=rnd.number,
                attempt=effect.attempt,
                node_id=effect.node_id,
                base_version=effect.base_version,
                inner_steps=effect.inner_steps,
                created_at=effect.created_at,
                deadline_at=effect.deadline_at,
                status=AssignmentStatus.ASSIGNED,
            )
            s.add(row)
            applied.assignments.append(row)
        elif isinstance(effect, RecordContribution):
            a = _outstanding(s, run, effect.assignment_id)
            contribution = m.Contribution.accepted(
                effect.row.digest,
                a,
                dict(effect.row.claims),
                effect.row.bytes_up,
                effect.created_at,
                **{**effect.row.columns, **(contribution_columns or {})},
            )
            # every column, unset ones as NULL: the INSERT the ORM's flush would send
            attrs = contribution.__dict__  # its attributes as set, without instrumentation
            values = {key: attrs.get(key) for key in _CONTRIBUTION_COLUMNS}
            conn = conn or s.connection()
            conn.execute(_INSERT_CONTRIBUTION, values)
            applied.contributions.append(contribution)
        elif isinstance(effect, MarkSubmitted | MarkLate):
            a = _outstanding(s, run, effect.assignment_id)
            to = (
                AssignmentStatus.SUBMITTED
                if isinstance(effect, MarkSubmitted)
                else AssignmentStatus.LATE
            )
            checked_move("assignment", ASSIGNMENT_MOVES, ASSIGNMENT_START, a.status, to)
            conn = conn or s.connection()
            moved = conn.execute(_MOVE_OUTSTANDING, {"assignment_id": a.id, "to": to})
            if moved.rowcount != 1:  # the row moved meanwhile: the caller's lock was not held
                raise IllegalEvent(f"assignment {a.id} is no longer outstanding")
            set_committed_value(a, "status", to)
        elif isinstance(effect, MarkMissed | MissOutstanding):
            where = [
                m.Assignment.run_id == run.id,
                m.Assignment.round == rnd.number,
                m.Assignment.status == AssignmentStatus.ASSIGNED,
            ]
            if isinstance(effect, MarkMissed):
                where.append(m.Assignment.node_id.in_(effect.node_ids))
            s.execute(update(m.Assignment).where(*where).values(status=AssignmentStatus.MISSED))
        elif isinstance(effect, Replan):
            rnd.attempt = effect.attempt
            if effect.deadline_at is None:
                rnd.status, rnd.opened_at, rnd.deadline_at = RoundStatus.PENDING, None, None
            else:
                rnd.deadline_at = effect.deadline_at
        elif isinstance(effect, CloseRound):
            rnd.status, rnd.closed_at = RoundStatus.CLOSED, effect.closed_at
            rnd.close_reason = effect.reason
        elif isinstance(effect, AdvanceRun):
            run.version, run.tokens_total = effect.version, effect.tokens_total
        elif isinstance(effect, FinishRun):
            finished = transition(RunState(run.status), RunEvent.FINISH)
            if not isinstance(finished, RunState):
                raise IllegalEvent(finished.detail)  # only an active run's round closes
            run.status = finished
            run.finished_at = run.status_changed_at = effect.finished_at
            run.status_reason = effect.reason
            if effect.source is FinishSource.PRIVACY:
                s.merge(
                    m.PrivacyRun(
                        run_id=run.id, stop_reason=effect.reason, stopped_at=effect.finished_at
                    )
                )
        elif isinstance(effect, OpenNextRound):
            run.round = effect.number
            s.add(
                m.Round(
                    run_id=run.id,
                    number=effect.number,
                    base_version=effect.base_version,
                    attempt=0,
                    status=RoundStatus.PENDING,
                )
            )
        elif isinstance(effect, OpenSecAgg):
            if secagg_config is None:
                raise IllegalEvent(f"round {rnd.number}'s SecAgg session needs its config")
            rnd.status = RoundStatus.SECAGG
            sess = s.get(m.SecAggSession, (run.id, rnd.number))
            if sess is None:  # the first attempt's; a retrained round reuses its row
                sess = m.SecAggSession(run_id=run.id, round=rnd.number, failures=0)
                s.add(sess)
            sess.attempt, sess.stage, sess.config_json = effect.attempt, "share", secagg_config
            sess.opened_at, sess.closed_at = effect.opened_at, None
            sess.stage_deadline_at = effect.stage_deadline_at
            sess.survivors = sess.dropped = None
            sess.sum_blob = sess.aggregate_blob = None
        elif isinstance(effect, AdvanceStage):
            sess = _session(s, run, rnd)
            if NEXT_STAGE.get(sess.stage) != effect.stage or effect.stage == "done":
                raise IllegalEvent(f"a SecAgg session at {sess.stage} cannot go to {effect.stage}")
            sess.stage, sess.stage_deadline_at = effect.stage, effect.deadline_at
        elif isinstance(effect, FailSecAgg):
            sess = _session(s, run, rnd)
            of_round = (m.Contribution.run_id == run.id, m.Contribution.round == rnd.number)
            s.execute(
                update(m.Contribution)
                .where(*of_round, m.Contribution.status.in_(sorted(DISCARDABLE)))
                .values(status=ContributionStatus.DISCARDED)
            )
            s.execute(
                update(m.Assignment)
                .where(
                    m.Assignment.run_id == run.id,
                    m.Assignment.round == rnd.number,
                    m.Assignment.status.in_(sorted(HOLDS_PLACE)),
                )
                .values(status=AssignmentStatus.DISCARDED)
            )
            sess.stage, sess.closed_at = "failed", effect.failed_at
            sess.failures += 1
            sess.last_failure = effect.reason
        elif isinstance(effect, FinishSecAgg):
            sess = _session(s, run, rnd)
            if sess.stage != "unmask":
                raise IllegalEvent(f"a SecAgg session at {sess.stage} has no sum to finish")
            s.execute(
                update(m.Contribution)
                .where(
                    m.Contribution.run_id == run.id,
                    m.Contribution.round == rnd.number,
                    m.Contribution.status == ContributionStatus.ACCEPTED,
                    m.Contribution.node_id.not_in(effect.survivors),
                )
                .values(status=ContributionStatus.DROPPED)  # never in the sum: no tokens, no reward
            )
            sess.stage, sess.closed_at = "done", effect.finished_at
            sess.survivors, sess.dropped = len(effect.survivors), effect.dropped
        else:  # pragma: no cover - a new effect without its SQL
            raise TypeError(f"no SQL for effect {effect!r}")
    return applied


def _outstanding(s: Session, run: m.Run, assignment_id: str) -> m.Assignment:
    """The outstanding assignment an upload's effect names (from `s`'s identity map when the
    caller loaded it); anything else is a bug in the caller, refused before any write."""
    a = s.get(m.Assignment, assignment_id)
    if a is None or a.run_id != run.id or a.status != AssignmentStatus.ASSIGNED:
        status = None if a is None else a.status
        raise IllegalEvent(f"assignment {assignment_id} is {status}: no upload is stored for it")
    return a


def _session(s: Session, run: m.Run, rnd: m.Round) -> m.SecAggSession:
    """The round's SecAgg session row, which a stage effect needs (none: a bug in the caller)."""
    sess = s.get(m.SecAggSession, (run.id, rnd.number))
    if sess is None or rnd.status != RoundStatus.SECAGG:
        raise IllegalEvent(f"round {rnd.number} ({rnd.status}) has no SecAgg session running")
    return sess


def run_snapshot(run: m.Run) -> RunSnapshot:
    """The run's row as the engine sees it, without its settings (an ask or an upload must
    learn that the run is not active before its settings are read: they may no longer parse)
    and without a query."""
    return RunSnapshot(
        status=RunState(run.status),
        version=run.version,
        tokens_total=run.tokens_total,
        id=run.id,
        status_reason=run.status_reason,
    )


def row_snapshot(
    run: m.Run, rnd: m.Round | None, run_snap: RunSnapshot | None = None
) -> RoundSnapshot:
    """The engine's view of `run`'s current round `rnd` from the rows alone, no query: no
    assignments and no counts (an ask carries the seat counts, an upload its assignment's
    facts). A run without its current round row (none: a bug, or a run being torn down) is
    seen as one whose round is closed, so nothing is assigned or accepted for it. `run_snap`:
    `run_snapshot(run)` if the caller has it already (one per batch of asks)."""
    run_snap = run_snap or run_snapshot(run)
    if rnd is None:
        return RoundSnapshot(run_snap, run.round, run.version, RoundStatus.CLOSED, 0, None)
    return RoundSnapshot(
        run=run_snap,
        number=rnd.number,
        base_version=rnd.base_version,
        status=RoundStatus(rnd.status),
        attempt=rnd.attempt,
        deadline_at=rnd.deadline_at,
    )


def read_snapshot(
    s: Session, run: m.Run, heard_since: float, silent_before: float | None = None
) -> tuple[m.Round, RoundSnapshot]:
    """`run`'s current round row and the engine's view of it: its assignments with their
    nodes' last heartbeat, and its accepted contributions (all attempts: what a re-plan keeps).
    A node's silence counts from `heard_since` (the hub's start) at the earliest: no one is
    lost for the hub's own outage.

    With `silent_before` (now - liveness_s: what the hub's ticker passes) a summary: the
    assignments are counted by status in SQL, and only the outstanding ones of nodes not heard
    from since then are read (the only ones a tick may find lost), so a tick of a 10,000-node
    round reads a few rows, not 10,000; and the earliest last-seen time of all its outstanding
    assignments' nodes (`outstanding_seen_at`: when the ticker must look again)."""
    rnd = s.get(m.Round, (run.id, run.round))
    of_round = (m.Assignment.run_id == run.id, m.Assignment.round == run.round)
    query = (
        select(m.Assignment.node_id, m.Assignment.status, m.Node.last_seen_at)
        .join(m.Node, m.Node.id == m.Assignment.node_id)
        .where(*of_round)
    )
    outstanding = submitted = None
    outstanding_seen_at: float | None = None
    if silent_before is not None:
        counts = dict(
            s.execute(
                select(m.Assignment.status, func.count())
                .where(*of_round, m.Assignment.status.in_(HOLDS_PLACE))
                .group_by(m.Assignment.status)
            ).all()
        )
        outstanding = counts.get(AssignmentStatus.ASSIGNED, 0)
        submitted = counts.get(AssignmentStatus.SUBMITTED, 0)
        query = query.where(
            m.Assignment.status == AssignmentStatus.ASSIGNED,
            m.Node.last_seen_at < silent_before,
        )
        if outstanding:  # when the first of them can go silent (the ticker's next wake-up)
            seen_at = s.scalar(
                select(func.min(m.Node.last_seen_at))
                .select_from(m.Assignment)
                .join(m.Node, m.Node.id == m.Assignment.node_id)
                .where(*of_round, m.Assignment.status == AssignmentStatus.ASSIGNED)
            )
            outstanding_seen_at = None if seen_at is None else max(seen_at, heard_since)
    rows = s.execute(query).all()
    accepted = s.scalar(
        select(func.count()).where(
            m.Contribution.run_id == run.id,
            m.Contribution.round == run.round,
            m.Contribution.status == ContributionStatus.ACCEPTED,  # not those rejected by audits
        )
    )
    cfg = run.settings()
    sess = (
        s.get(m.SecAggSession, (run.id, rnd.number)) if rnd.status == RoundStatus.SECAGG else None
    )
    snapshot = RoundSnapshot(
        run=RunSnapshot(
            status=RunState(run.status),
            version=run.version,
            tokens_total=run.tokens_total,
            rounds_budget=cfg.budget.rounds,
            tokens_budget=cfg.budget.tokens,
            id=run.id,
            status_reason=run.status_reason,
        ),
        number=rnd.number,
        base_version=rnd.base_version,
        status=RoundStatus(rnd.status),
        attempt=rnd.attempt,
        deadline_at=rnd.deadline_at,
        assignments=tuple(
            AssignmentState(n, AssignmentStatus(st), max(seen, heard_since)) for n, st, seen in rows
        ),
        outstanding=outstanding,
        submitted=submitted,
        accepted=int(accepted or 0),
        secagg_stage=None if sess is None else sess.stage,
        outstanding_seen_at=outstanding_seen_at,
    )
    return rnd, snapshot
