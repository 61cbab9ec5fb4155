"""The `assignments` and `contributions` tables as the service reads them outside the round
engine's store (`store/rounds.py`, which writes them): an upload's facts before the lock, a
batch's assignments, a round's places (the counts an ask decides on), a round's accepted
contributions, and each node's recent contributions (its achieved speed).

Plain functions over the caller's `Session` (or, for an upload's facts, a bare `Connection`):
none commits; the caller owns the transaction, the run-row locks and the service lock.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, Row, bindparam, func, select
from sqlalchemy.orm import Session

from gridswarm.hub import models as m
from gridswarm.hub.states import HOLDS_PLACE, AssignmentStatus, ContributionStatus
from gridswarm.protocol import NodeStatus

UPLOAD_FACTS_QUERY = select(  # built once: an upload's check only binds its three ids
    select(m.Run.status).where(m.Run.id == bindparam("run")).scalar_subquery(),
    select(m.Node.region).where(m.Node.id == bindparam("node")).scalar_subquery(),
    select(m.Assignment.round)
    .where(m.Assignment.id == bindparam("assignment"), m.Assignment.run_id == bindparam("run"))
    .scalar_subquery(),
)


def upload_facts(
    conn: Connection, run_id: str, node_id: str, assignment_id: str
) -> Row[tuple[str | None, str | None, int | None]]:
    """(run status, node region, assignment round) of an upload, each None where its row is
    missing: one prebuilt statement (`UPLOAD_FACTS_QUERY`) on a plain connection, no ORM."""
    params = {"run": run_id, "node": node_id, "assignment": assignment_id}
    return conn.execute(UPLOAD_FACTS_QUERY, params).one()


def assignment_row(s: Session, assignment_id: str) -> m.Assignment | None:
    """The assignment's row (from `s`'s identity map when loaded there), None if none."""
    return s.get(m.Assignment, assignment_id)


def assignments_by_id(s: Session, assignment_ids: Sequence[str]) -> Sequence[m.Assignment]:
    """The rows of those of `assignment_ids` that exist, in one query (a batch's uploads)."""
    return s.scalars(select(m.Assignment).where(m.Assignment.id.in_(assignment_ids))).all()


def runs_with_outstanding(s: Session, node_ids: Sequence[str]) -> set[str]:
    """The runs in which `node_ids` hold outstanding (assigned) work: those to lock before it
    is released."""
    return set(
        s.scalars(
            select(m.Assignment.run_id).where(
                m.Assignment.node_id.in_(node_ids),
                m.Assignment.status == AssignmentStatus.ASSIGNED,
            )
        )
    )


def _holds_place(run_id: str, round_number: int) -> tuple:
    """The clauses of a round's place-holding (assigned or submitted) assignments."""
    return (
        m.Assignment.run_id == run_id,
        m.Assignment.round == round_number,
        m.Assignment.status.in_(sorted(HOLDS_PLACE)),
    )


def seated_nodes(s: Session, run_id: str, round_number: int, node_ids: Sequence[str]) -> set[str]:
    """Those of `node_ids` holding a place in the round."""
    where = _holds_place(run_id, round_number)
    return set(
        s.scalars(select(m.Assignment.node_id).where(*where, m.Assignment.node_id.in_(node_ids)))
    )


def place_holders(s: Session, run_id: str, round_number: int) -> set[str]:
    """Every node holding a place in the round."""
    where = _holds_place(run_id, round_number)
    return set(s.scalars(select(m.Assignment.node_id).where(*where)))


def count_places_taken(s: Session, run_id: str, round_number: int) -> int | None:
    """How many places of the round are taken (assignments assigned or submitted)."""
    return s.scalar(select(func.count()).where(*_holds_place(run_id, round_number)))


def count_live_with_place(s: Session, run_id: str, round_number: int, cutoff: float) -> int | None:
    """How many nodes heard from at `cutoff` or later, and not gone, hold a place in the
    round."""
    return s.scalar(
        select(func.count())
        .select_from(m.Assignment)
        .join(m.Node, m.Node.id == m.Assignment.node_id)
        .where(
            *_holds_place(run_id, round_number),
            m.Node.last_seen_at >= cutoff,
            m.Node.status != NodeStatus.LEFT,
        )
    )


def held_assignment(
    s: Session, run_id: str, round_number: int, node_id: str
) -> m.Assignment | None:
    """`node_id`'s outstanding assignment in the round, if any (an ask repeated after its
    answer was lost)."""
    return s.scalars(
        select(m.Assignment).where(
            m.Assignment.run_id == run_id,
            m.Assignment.round == round_number,
            m.Assignment.node_id == node_id,
            m.Assignment.status == AssignmentStatus.ASSIGNED,
        )
    ).first()


def contribution_row(s: Session, digest: str) -> m.Contribution | None:
    """The contribution whose blob is `digest`, None if no row names it."""
    return s.get(m.Contribution, digest)


def accepted_contributions(s: Session, run_id: str, round_number: int) -> Sequence[m.Contribution]:
    """The round's accepted contributions (all attempts), by node id: what a close aggregates."""
    return s.scalars(
        select(m.Contribution)
        .where(
            m.Contribution.run_id == run_id,
            m.Contribution.round == round_number,
            m.Contribution.status == ContributionStatus.ACCEPTED,
        )
        .order_by(m.Contribution.node_id)
    ).all()


def run_contributions(s: Session, run_id: str) -> Sequence[m.Contribution]:
    """Every contribution of a run (its energy and carbon report)."""
    return s.scalars(select(m.Contribution).where(m.Contribution.run_id == run_id)).all()


def recent_speeds(
    s: Session, run_id: str, node_ids: Sequence[str], window: int
) -> Sequence[Row[tuple[str, int, float]]]:
    """(node id, tokens, train time s) of each of `node_ids`' last `window` contributions to
    `run_id`, oldest first per node: one query for the batch, the contributions ranked per node
    by a window function (never one query per node)."""
    rank = (
        func.row_number()
        .over(partition_by=m.Contribution.node_id, order_by=m.Contribution.round.desc())
        .label("rank")
    )
    ranked = (
        select(
            m.Contribution.node_id,
            m.Contribution.tokens,
            m.Contribution.train_time_s,
            rank,
        )
        .where(m.Contribution.run_id == run_id, m.Contribution.node_id.in_(node_ids))
        .subquery()
    )
    return s.execute(
        select(ranked.c.node_id, ranked.c.tokens, ranked.c.train_time_s)
        .where(ranked.c.rank <= window)
        .order_by(ranked.c.node_id, ranked.c.rank.desc())  # oldest first, per node
    ).all()
