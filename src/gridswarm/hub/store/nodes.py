"""The `nodes` table as the service reads and writes it: node rows by id, the live nodes (the
`last_seen_at` index), the batched liveness writes (heartbeats and signs of life) and the new
rows of registrations.

Plain functions over the caller's `Session`: none commits; the caller owns the transaction, the
run-row locks it takes before node rows, and the service lock.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Row, func, select, update
from sqlalchemy.orm import Session

from gridswarm.hub import models as m
from gridswarm.protocol import NodeStatus


def node_row(s: Session, node_id: str) -> m.Node | None:
    """`node_id`'s row (from `s`'s identity map when loaded there), None if not registered."""
    return s.get(m.Node, node_id)


def nodes_by_id(s: Session, node_ids: Sequence[str]) -> Sequence[m.Node]:
    """The rows of those of `node_ids` that are registered, in one query (a batch's nodes)."""
    return s.scalars(select(m.Node).where(m.Node.id.in_(node_ids))).all()


def all_nodes(s: Session) -> Sequence[m.Node]:
    """Every node row (a run's report names its participants among them)."""
    return s.scalars(select(m.Node)).all()


def add_node(
    s: Session, node_id: str, public_key_hex: str, registered_at: float, register_net: str | None
) -> m.Node:
    """A new node's row, added to `s` (inserted at the caller's flush); the caller fills the
    columns every registration sets."""
    node = m.Node(
        id=node_id,
        public_key=public_key_hex,
        registered_at=registered_at,
        register_net=register_net,
    )
    s.add(node)
    return node


def count_live_nodes(s: Session, cutoff: float) -> int | None:
    """How many nodes were heard from at `cutoff` or later and have not left (one indexed count
    over `last_seen_at`)."""
    return s.scalar(
        select(func.count()).where(m.Node.last_seen_at >= cutoff, m.Node.status != NodeStatus.LEFT)
    )


def live_nodes(s: Session, cutoff: float) -> Sequence[m.Node]:
    """The rows of the nodes heard from at `cutoff` or later that have not left (one indexed
    query)."""
    return s.scalars(
        select(m.Node).where(m.Node.last_seen_at >= cutoff, m.Node.status != NodeStatus.LEFT)
    ).all()


def live_node_probes(s: Session, cutoff: float) -> Sequence[Row[tuple[str, float]]]:
    """(id, probe rate) of each live node (as `live_nodes`): what the fastest live node's
    speed is computed from."""
    return s.execute(
        select(m.Node.id, m.Node.probe_rate).where(
            m.Node.last_seen_at >= cutoff, m.Node.status != NodeStatus.LEFT
        )
    ).all()


def write_heartbeats(s: Session, beats: list[tuple[str, NodeStatus, float]]) -> None:
    """Write (node id, status, seen at) notes in one executemany UPDATE by primary key. The
    caller passes them in id order: two replicas' batches never wait for each other in a
    cycle."""
    s.execute(
        update(m.Node),
        [
            {"id": node_id, "status": status, "last_seen_at": seen_at}
            for node_id, status, seen_at in beats
        ],
    )


def mark_seen(s: Session, times: list[tuple[str, float]]) -> None:
    """Write (node id, seen at) signs of life in one executemany UPDATE by primary key (the
    time alone; in id order, as `write_heartbeats`)."""
    s.execute(update(m.Node), [{"id": n, "last_seen_at": at} for n, at in times])


def touch_nodes(s: Session, node_ids: Sequence[str], at: float) -> None:
    """Note `node_ids` (sorted by the caller) heard from at `at`, in one UPDATE."""
    s.execute(update(m.Node).where(m.Node.id.in_(node_ids)).values(last_seen_at=at))
