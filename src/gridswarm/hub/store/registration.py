"""The reads behind the hub's bounds on node identities (`hub/registration.py`) and its
preference for nodes that have worked (`hub/trust.py` admission): whether a key is registered,
a network's recent registrations, and which nodes have "worked" (an accepted contribution in a
closed round). All read only, on the caller's session."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from gridswarm.hub import models as m
from gridswarm.hub.states import HOLDS_PLACE, ContributionStatus, RoundStatus
from gridswarm.protocol import NodeStatus


def _worked(node_id: ColumnElement) -> ColumnElement[bool]:
    """SQL: the node `node_id` has an accepted contribution in a closed round."""
    return (
        select(m.Contribution.node_id)
        .join(
            m.Round,
            (m.Round.run_id == m.Contribution.run_id) & (m.Round.number == m.Contribution.round),
        )
        .where(
            m.Contribution.node_id == node_id,
            m.Contribution.status == ContributionStatus.ACCEPTED,
            m.Round.status == RoundStatus.CLOSED,
        )
        .exists()
    )


def proven_nodes(s: Session, node_ids: Iterable[str]) -> set[str]:
    """Those of `node_ids` that have worked (an accepted contribution in a closed round)."""
    ids = sorted(set(node_ids))
    if not ids:
        return set()
    rows = s.scalars(
        select(m.Contribution.node_id)
        .join(
            m.Round,
            (m.Round.run_id == m.Contribution.run_id) & (m.Round.number == m.Contribution.round),
        )
        .where(
            m.Contribution.node_id.in_(ids),
            m.Contribution.status == ContributionStatus.ACCEPTED,
            m.Round.status == RoundStatus.CLOSED,
        )
        .distinct()
    )
    return set(rows)


def newcomers_placed(s: Session, run_id: str, round_number: int) -> int:
    """Nodes holding a place in round `round_number` of `run_id` (assigned or submitted) that
    have never worked: one count over the round's assignments (at most `max_nodes` rows), as
    stored (the caller adds what its own transaction has not flushed)."""
    return s.scalar(
        select(func.count())
        .select_from(m.Assignment)
        .where(
            m.Assignment.run_id == run_id,
            m.Assignment.round == round_number,
            m.Assignment.status.in_(sorted(HOLDS_PLACE)),
            ~_worked(m.Assignment.node_id),
        )
    )


def new_nodes_live(s: Session, live_since: float) -> int:
    """Live identities (heard from since `live_since`, not left) that have never worked."""
    return s.scalar(
        select(func.count())
        .select_from(m.Node)
        .where(
            m.Node.last_seen_at >= live_since, m.Node.status != NodeStatus.LEFT, ~_worked(m.Node.id)
        )
    )


def is_registered(s: Session, node_id: str) -> bool:
    """Whether node `node_id` has a row (by primary key: the session's identity map first)."""
    return s.get(m.Node, node_id) is not None


def recent_registrations(s: Session, network: str, since: float, limit: int) -> list[float]:
    """Registration times (seconds) of the newest `limit` identities from client network
    `network` registered after `since`, newest first."""
    return list(
        s.scalars(
            select(m.Node.registered_at)
            .where(m.Node.register_net == network, m.Node.registered_at > since)
            .order_by(m.Node.registered_at.desc())
            .limit(limit)
        )
    )
