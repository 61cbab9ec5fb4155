"""The privacy machinery's rows (`hub/privacy.py`): the DP accountant's rounds, the SecAgg
sessions and their stage messages, and the contribution reads of the SecAgg requests.

Plain functions over the caller's `Session`: none commits, and none decides; `HubPrivacy`
holds the service lock and the run's row lock, owns the transaction, and decides (the round
engine, `hub/engine.py`, decides the stages; `hub/store/rounds.py` writes the session row's
status columns). Rows by primary key (run, node, round, assignment) and a stage's node rows
are `store/runs.py`'s, `store/nodes.py`'s and `store/contributions.py`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import ScalarResult, delete, select
from sqlalchemy.orm import Session

from gridswarm.hub import models as m
from gridswarm.hub.states import ContributionStatus

# ------------------------------------------------------------------ DP accounting


def dp_rounds(s: Session, run_id: str) -> list[m.PrivacyRound]:
    """The run's DP rounds in round order (the accountant's history)."""
    return list(
        s.scalars(
            select(m.PrivacyRound)
            .where(m.PrivacyRound.run_id == run_id)
            .order_by(m.PrivacyRound.round)
        )
    )


def add_dp_round(
    s: Session,
    run_id: str,
    number: int,
    noise_multiplier: float,
    sample_rate: float,
    clip_norm: float,
    nodes: int,
    clipped: int | None,
    epsilon: float,
    delta: float,
    created_at: float,
) -> None:
    """Record a DP round's noise, clipping and the epsilon spent after it; flushed at once, so
    the accountant's next read in this transaction (`dp_rounds`) counts it."""
    s.add(
        m.PrivacyRound(
            run_id=run_id,
            round=number,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            clip_norm=clip_norm,
            nodes=nodes,
            clipped=clipped,
            epsilon=epsilon,
            delta=delta,
            created_at=created_at,
        )
    )
    s.flush()


def privacy_run(s: Session, run_id: str) -> m.PrivacyRun | None:
    """Why the run stopped for its privacy budget (none: it did not)."""
    return s.get(m.PrivacyRun, run_id)


# ------------------------------------------------------------------ SecAgg sessions


def secagg_sessions(s: Session, run_id: str) -> Sequence[m.SecAggSession]:
    """The run's SecAgg session rows, one per round, in round order."""
    return s.scalars(
        select(m.SecAggSession)
        .where(m.SecAggSession.run_id == run_id)
        .order_by(m.SecAggSession.round)
    ).all()


def secagg_session(s: Session, run_id: str, number: int) -> m.SecAggSession | None:
    """Round `number`'s SecAgg session (none: the round has not reached its SecAgg stages)."""
    return s.get(m.SecAggSession, (run_id, number))


def accepted_node_ids(s: Session, run_id: str, number: int) -> ScalarResult[str]:
    """The nodes of round `number`'s accepted contributions (the session's participants)."""
    return s.scalars(
        select(m.Contribution.node_id).where(
            m.Contribution.run_id == run_id,
            m.Contribution.round == number,
            m.Contribution.status == ContributionStatus.ACCEPTED,
        )
    )


def flush_stage(s: Session) -> None:
    """Send a stage move's writes (the session's columns, its deleted messages) now, in the
    caller's transaction, so its next reads see the stage as moved."""
    s.flush()


# ------------------------------------------------------------------ SecAgg messages


def secagg_messages(s: Session, run_id: str, number: int, stage: str) -> dict[str, str]:
    """node id -> stored body of each message of `stage` in round `number`."""
    rows = s.execute(
        select(m.SecAggMessage.node_id, m.SecAggMessage.body).where(
            m.SecAggMessage.run_id == run_id,
            m.SecAggMessage.round == number,
            m.SecAggMessage.stage == stage,
        )
    ).all()
    return dict(rows)


def add_secagg_message(
    s: Session, run_id: str, number: int, stage: str, node_id: str, body: str, created_at: float
) -> None:
    """Store one node's message of `stage` in round `number` (written at the caller's commit)."""
    s.add(
        m.SecAggMessage(
            run_id=run_id,
            round=number,
            stage=stage,
            node_id=node_id,
            body=body,
            created_at=created_at,
        )
    )


def delete_secagg_messages(s: Session, run_id: str, number: int) -> None:
    """Remove every stage message of round `number` (a failed attempt: the retrain starts from
    fresh keys)."""
    s.execute(
        delete(m.SecAggMessage).where(
            m.SecAggMessage.run_id == run_id, m.SecAggMessage.round == number
        )
    )


# ------------------------------------------------------------------ nodes and contributions


def assignment_contribution(s: Session, assignment_id: str) -> m.Contribution | None:
    """The contribution made for the assignment, if any."""
    return s.scalars(
        select(m.Contribution).where(m.Contribution.assignment_id == assignment_id)
    ).first()


def accepted_contribution(
    s: Session, run_id: str, number: int, node_id: str
) -> m.Contribution | None:
    """The node's accepted contribution to round `number` (what a stage message's bytes are
    counted on), if any."""
    return s.scalars(
        select(m.Contribution).where(
            m.Contribution.run_id == run_id,
            m.Contribution.round == number,
            m.Contribution.node_id == node_id,
            m.Contribution.status == ContributionStatus.ACCEPTED,
        )
    ).first()
