"""The one place the round engine's effects (`hub/engine.py`) become SQL.

`apply_effects` turns each effect into its UPDATE or INSERT on the caller's session, in order,
without committing: the caller holds the run's row lock and commits the effects together with
whatever heavy work preceded them (the version row and the settlement of a close), so that an
event's effects are stored in one transaction or not at all.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from gridswarm.hub import models as m
from gridswarm.hub.engine import (
    AdvanceRun,
    CloseRound,
    Effect,
    FinishRun,
    FinishSource,
    IllegalEvent,
    MarkMissed,
    MissOutstanding,
    OpenNextRound,
    Replan,
    RoundSnapshot,
    RunSnapshot,
)
from gridswarm.hub.lifecycle import RunEvent, RunState, transition
from gridswarm.hub.rounds import AssignmentState
from gridswarm.hub.states import HOLDS_PLACE, AssignmentStatus, ContributionStatus, RoundStatus


def apply_effects(s: Session, run: m.Run, rnd: m.Round, effects: Iterable[Effect]) -> None:
    """Write `effects` of one engine step on `run`'s round `rnd` (both loaded in `s`, the run's
    row locked). Bulk UPDATEs name their source status, so a row that moved meanwhile is left
    alone (tests/hub/test_states.py checks each move against `hub/states.py`)."""
    for effect in effects:
        if isinstance(effect, MarkMissed | MissOutstanding):
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
        else:  # pragma: no cover - a new effect without its SQL
            raise TypeError(f"no SQL for effect {effect!r}")


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
    round reads a few rows, not 10,000 (twice a tick, four ticks a second)."""
    rnd = s.get(m.Round, (run.id, run.round))
    of_round = (m.Assignment.run_id == run.id, m.Assignment.round == run.round)
    query = (
        select(m.Assignment.node_id, m.Assignment.status, m.Node.last_seen_at)
        .join(m.Node, m.Node.id == m.Assignment.node_id)
        .where(*of_round)
    )
    outstanding = submitted = None
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
    rows = s.execute(query).all()
    accepted = s.scalar(
        select(func.count()).where(
            m.Contribution.run_id == run.id,
            m.Contribution.round == run.round,
            m.Contribution.status == ContributionStatus.ACCEPTED,  # not those rejected by audits
        )
    )
    cfg = run.settings()
    snapshot = RoundSnapshot(
        run=RunSnapshot(
            status=RunState(run.status),
            version=run.version,
            tokens_total=run.tokens_total,
            rounds_budget=cfg.budget.rounds,
            tokens_budget=cfg.budget.tokens,
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
    )
    return rnd, snapshot
