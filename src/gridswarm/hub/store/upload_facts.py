"""The two reads a batch of uploads makes once (`hub/upload_facts.py`): the run's newest
contributions (the energy floor's window) and its contributions carrying one of the batch's
update digests (the replay check). Both run on the caller's session, under the run's row lock
the caller holds; neither commits."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from gridswarm.hub import models as m


def newest_contributions(s: Session, run_id: str, limit: int) -> Sequence[Row]:
    """(created_at, node_id, tokens, train_time_s) of the run's newest `limit` contributions,
    newest first: `EnergyWindow.read`'s one query."""
    return s.execute(
        select(
            m.Contribution.created_at,
            m.Contribution.node_id,
            m.Contribution.tokens,
            m.Contribution.train_time_s,
        )
        .where(m.Contribution.run_id == run_id)
        .order_by(m.Contribution.created_at.desc())
        .limit(limit)
    ).all()


def contributions_with_digests(s: Session, run_id: str, digests: list[str]) -> Sequence[Row]:
    """(update_sha256, id, node_id, round) of the run's contributions whose update digest is
    one of `digests` (non-empty), in one `IN` query: `ReplayIndex.read`'s."""
    return s.execute(
        select(
            m.Contribution.update_sha256,
            m.Contribution.id,
            m.Contribution.node_id,
            m.Contribution.round,
        ).where(
            m.Contribution.run_id == run_id,
            m.Contribution.update_sha256.in_(sorted(set(digests))),
        )
    ).all()
