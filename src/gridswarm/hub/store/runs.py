"""The `runs` table as the service reads and writes it, with what a run's lifecycle writes
beside it: a new run's rows, its current round row, the runs the ticker and the long-polls look
at, the sponsor's quotas, failure reports and the release of a held or ended run's work.

Plain functions over the caller's `Session`: none commits; the caller owns the transaction,
the run-row lock (`hub/replicas.lock_run`, taken before anything here changes a run) and the
service lock, and decides what to write.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Result, Row, func, select, update
from sqlalchemy.orm import Session

from gridswarm.hub import models as m
from gridswarm.hub.lifecycle import RunState
from gridswarm.hub.states import AssignmentStatus, RoundStatus


def run_row(s: Session, run_id: str) -> m.Run | None:
    """The run's row, unlocked (from `s`'s identity map when loaded there), None if none."""
    return s.get(m.Run, run_id)


def round_row(s: Session, run_id: str, number: int) -> m.Round | None:
    """Round `number` of `run_id` (from `s`'s identity map when loaded there), None if none."""
    return s.get(m.Round, (run_id, number))


def add_run(s: Session, run: m.Run, first_version: m.Version, first_round: m.Round) -> None:
    """A new run's rows: the run (flushed first, so the rows that name it insert after it),
    then its version 0 and its pending round 0, inserted at the caller's commit."""
    s.add(run)
    s.flush()
    s.add(first_version)
    s.add(first_round)


def active_run_ids(s: Session) -> Sequence[str]:
    """The ids of the active runs (what a tick advances)."""
    return s.scalars(select(m.Run.id).where(m.Run.status == RunState.ACTIVE)).all()


def run_configs(s: Session) -> Result[tuple[str, str]]:
    """(id, stored settings) of every run, streamed (the datasets runs train on are read from
    them)."""
    return s.execute(select(m.Run.id, m.Run.config_json))


def pending_round_runs(s: Session) -> Sequence[Row[tuple[str, str]]]:
    """(id, stored settings) of the active runs whose current round is pending (those a count
    of live nodes may wake)."""
    return s.execute(
        select(m.Run.id, m.Run.config_json)
        .join(m.Round, (m.Round.run_id == m.Run.id) & (m.Round.number == m.Run.round))
        .where(m.Run.status == RunState.ACTIVE, m.Round.status == RoundStatus.PENDING)
    ).all()


def count_active_runs_of(s: Session, sponsor_key_hex: str) -> int | None:
    """How many active runs the sponsor `sponsor_key_hex` has (its quota)."""
    return s.scalar(
        select(func.count()).where(
            m.Run.sponsor_key == sponsor_key_hex, m.Run.status == RunState.ACTIVE
        )
    )


def run_creation_times_of(s: Session, sponsor_key_hex: str, after: float) -> Sequence[float]:
    """When the sponsor's runs created after `after` were created (its hourly quota)."""
    return s.scalars(
        select(m.Run.created_at).where(
            m.Run.sponsor_key == sponsor_key_hex, m.Run.created_at > after
        )
    ).all()


def release_run_assignments(s: Session, run_id: str) -> int:
    """Release every outstanding assignment of a run that stops handing out work (held or
    ended); how many were released. The caller holds the run's row lock."""
    return s.execute(
        update(m.Assignment)
        .where(m.Assignment.run_id == run_id, m.Assignment.status == AssignmentStatus.ASSIGNED)
        .values(status=AssignmentStatus.RELEASED)
    ).rowcount


def add_run_failure(
    s: Session, run_id: str, node_id: str, round_number: int, reason: str, created_at: float
) -> None:
    """Store a node's failure report, flushed at once (the count of failures that follows
    includes it)."""
    s.add(
        m.RunFailure(
            run_id=run_id,
            node_id=node_id,
            round=round_number,
            reason=reason,
            created_at=created_at,
        )
    )
    s.flush()


def count_failures_since(s: Session, run_id: str, since: float) -> int | None:
    """How many failure reports `run_id` received at `since` or later (the stall rule)."""
    return s.scalar(
        select(func.count()).where(m.RunFailure.run_id == run_id, m.RunFailure.created_at >= since)
    )
