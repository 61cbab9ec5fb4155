"""The reads behind what the hub shows about runs (`hub/reports.py`): the runs list and the rows
of one run's status. Read only, in the caller's session, with no lock: a report never holds
the hub's lock or a run's row lock."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ScalarResult, func, select
from sqlalchemy.orm import Session

from gridswarm.hub import models as m


def runs_by_age(s: Session) -> ScalarResult[m.Run]:
    """Every run, oldest first (`GET /v1/runs`)."""
    return s.scalars(select(m.Run).order_by(m.Run.created_at))


@dataclass(frozen=True)
class RunRows:
    """Everything a run's status is made of, read in one session."""

    run: m.Run
    versions: Sequence[m.Version]  # by number
    contributions: Sequence[m.Contribution]
    rounds: Sequence[m.Round]  # by number
    assignment_counts: Sequence[tuple[int, str, int]]  # (round, status, how many)
    bytes_down: Sequence[tuple[str, int | None]]  # (node, bytes it downloaded)
    nodes: dict[str, m.Node]  # every node the hub knows
    failures: Sequence[m.RunFailure]  # oldest first
    workers: Sequence[str]  # nodes ever given work in the run


def read_run_rows(s: Session, run: m.Run) -> RunRows:
    """The rows of `run` its status shows (`reports.run_status_json`): eight reads."""
    run_id = run.id
    return RunRows(
        run=run,
        versions=s.scalars(
            select(m.Version).where(m.Version.run_id == run_id).order_by(m.Version.number)
        ).all(),
        contributions=s.scalars(
            select(m.Contribution).where(m.Contribution.run_id == run_id)
        ).all(),
        rounds=s.scalars(
            select(m.Round).where(m.Round.run_id == run_id).order_by(m.Round.number)
        ).all(),
        assignment_counts=s.execute(
            select(m.Assignment.round, m.Assignment.status, func.count())
            .where(m.Assignment.run_id == run_id)
            .group_by(m.Assignment.round, m.Assignment.status)
        ).all(),
        bytes_down=s.execute(
            select(m.Download.node_id, func.sum(m.Download.bytes_down))
            .where(m.Download.run_id == run_id)
            .group_by(m.Download.node_id)
        ).all(),
        nodes={n.id: n for n in s.scalars(select(m.Node))},
        failures=s.scalars(
            select(m.RunFailure)
            .where(m.RunFailure.run_id == run_id)
            .order_by(m.RunFailure.created_at)
        ).all(),
        workers=s.scalars(
            select(m.Assignment.node_id).where(m.Assignment.run_id == run_id).distinct()
        ).all(),
    )
