"""The trust machinery's rows (`hub/trust.py`): reputations, the rounds' audit seeds, and the
contribution and assignment reads of screening and settlement.

Plain functions over the caller's `Session`: none commits, and none decides; `HubTrust` holds
the service lock and the runs' row locks, owns the transaction, and decides (with the pure
rules of `gridswarm.trust`). Settlement is one read (`read_settlement`) and one write
(`apply_settlement`) around the pure `trust/settlement.py` `settle`.

Rows by primary key and the reads the service shares (`assignments_by_id`,
`run_contributions`) are those of `store/runs.py`, `store/nodes.py`, `store/versions.py` and
`store/contributions.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Row, ScalarResult, func, select
from sqlalchemy.orm import Session

from gridswarm.config import RunConfig
from gridswarm.hub import models as m
from gridswarm.hub.lifecycle import RunState
from gridswarm.hub.states import ContributionStatus
from gridswarm.ledger.balances import RunEscrow
from gridswarm.trust.reputation import Reputation
from gridswarm.trust.settlement import ContributionFacts, RoundFacts, Settlement

# ------------------------------------------------------------------ reputation

REPUTATION_BATCH = 500  # node ids per reputation read (well under SQLite's bound-parameter limit)


def reputation_of(row: m.NodeReputation | None) -> Reputation:
    """A node's reputation as its row holds it (a node without a row: a fresh reputation)."""
    if row is None:
        return Reputation()
    return Reputation(
        consecutive_valid=row.consecutive_valid,
        audits_passed=row.audits_passed,
        audits_failed=row.audits_failed,
        strikes=row.strikes,
        liveness=row.liveness,
        usefulness=row.usefulness,
        score=row.score,
    )


def read_reputations(s: Session, node_ids: Sequence[str]) -> dict[str, Reputation]:
    """The reputations of `node_ids` (one query, by the table's primary key)."""
    rows = {
        r.node_id: r
        for r in s.scalars(
            select(m.NodeReputation).where(m.NodeReputation.node_id.in_(list(node_ids)))
        )
    }
    return {n: reputation_of(rows.get(n)) for n in node_ids}


def read_reputation(s: Session, node_id: str) -> Reputation:
    """One node's reputation (from the identity map when its row is loaded)."""
    return reputation_of(s.get(m.NodeReputation, node_id))


def write_reputation(s: Session, node_id: str, rep: Reputation, updated_at: float) -> None:
    """Store `rep` as the node's reputation (a new row for a node without one), written at
    the caller's flush or commit."""
    _set_reputation(s, s.get(m.NodeReputation, node_id), node_id, rep, updated_at)


def write_reputations(
    s: Session, steps: Sequence[tuple[str, Reputation]], clock: Callable[[], float]
) -> None:
    """`write_reputation` for each (node, reputation) step in order (a node's last step is
    what stays), each stamped by `clock`: the nodes' rows read in one query per
    REPUTATION_BATCH nodes and none flushed before the caller's flush. (One `get` per node,
    each flushing the row added before it, cost a round's close ~0.5 ms per new node under the
    hub's lock: 5 s for 10,000 newcomers.)"""
    node_ids = list(dict.fromkeys(node_id for node_id, _ in steps))
    rows: dict[str, m.NodeReputation | None] = dict.fromkeys(node_ids)
    with s.no_autoflush:
        for start in range(0, len(node_ids), REPUTATION_BATCH):
            batch = node_ids[start : start + REPUTATION_BATCH]
            query = select(m.NodeReputation).where(m.NodeReputation.node_id.in_(batch))
            rows.update((r.node_id, r) for r in s.scalars(query))
        for node_id, rep in steps:
            rows[node_id] = _set_reputation(s, rows[node_id], node_id, rep, clock())


def _set_reputation(
    s: Session, row: m.NodeReputation | None, node_id: str, rep: Reputation, updated_at: float
) -> m.NodeReputation:
    """`rep` set on the node's reputation row (`row`, or a new one added to `s`)."""
    if row is None:
        row = m.NodeReputation(node_id=node_id)
        s.add(row)
    for key, value in vars(rep).items():  # its scalar fields (asdict deep-copies: ~3x slower)
        setattr(row, key, value)
    row.updated_at = updated_at
    return row


# ------------------------------------------------------------------ audit seeds


def trust_round(s: Session, run_id: str, number: int) -> m.TrustRound | None:
    """The round's audit seed and its commitment (none: the round's seed is not drawn)."""
    return s.get(m.TrustRound, (run_id, number))


def add_trust_round(
    s: Session, run_id: str, number: int, audit_seed: str, commitment: str, opened_at: float
) -> m.TrustRound:
    """A new row for the round's secret audit seed (hex) and its sha256 commitment."""
    row = m.TrustRound(
        run_id=run_id,
        round=number,
        audit_seed=audit_seed,
        commitment=commitment,
        opened_at=opened_at,
    )
    s.add(row)
    return row


# ------------------------------------------------------------------ contributions


def others_recent_speeds(s: Session, run_id: str, node_id: str, limit: int) -> Sequence[Row[Any]]:
    """(tokens, train_time_s) of the run's newest `limit` contributions by nodes other than
    `node_id`: what the energy floor of an upload compares with (`HubTrust.energy_facts`)."""
    return s.execute(
        select(m.Contribution.tokens, m.Contribution.train_time_s)
        .where(m.Contribution.run_id == run_id, m.Contribution.node_id != node_id)
        .order_by(m.Contribution.created_at.desc())
        .limit(limit)
    ).all()


def unaudited_contributions(s: Session, limit: int) -> Sequence[m.Contribution]:
    """The oldest `limit` accepted contributions of active runs not yet audited (what
    `HubTrust.prescreen` examines as they arrive)."""
    return s.scalars(
        select(m.Contribution)
        .join(m.Run, m.Run.id == m.Contribution.run_id)
        .where(
            m.Run.status == RunState.ACTIVE,
            m.Contribution.status == ContributionStatus.ACCEPTED,
            m.Contribution.audited.is_(None),
        )
        .order_by(m.Contribution.created_at)
        .limit(limit)
    ).all()


def unaudited_in_round(s: Session, run_id: str, number: int) -> int:
    """How many of the round's accepted contributions are not yet audited (a due close waits,
    outside the lock, for `HubTrust.prescreen` to reach them: `Ticker._prescreen_round`)."""
    return s.scalar(
        select(func.count())
        .select_from(m.Contribution)
        .where(
            m.Contribution.run_id == run_id,
            m.Contribution.round == number,
            m.Contribution.status == ContributionStatus.ACCEPTED,
            m.Contribution.audited.is_(None),
        )
    )


def contributions_by_id(s: Session, ids: list[str]) -> ScalarResult[m.Contribution]:
    """The contributions with these ids (as stored now: a close may have screened them)."""
    return s.scalars(select(m.Contribution).where(m.Contribution.id.in_(ids)))


def round_contributions(s: Session, run_id: str, number: int) -> Sequence[m.Contribution]:
    """Every contribution of the run's round `number` (all attempts, all statuses), by node id:
    the order screening judges them and settlement splits the pool in."""
    return s.scalars(
        select(m.Contribution)
        .where(m.Contribution.run_id == run_id, m.Contribution.round == number)
        .order_by(m.Contribution.node_id)
    ).all()


def assigned_node_ids(s: Session, run_id: str, number: int) -> ScalarResult[str]:
    """The node id of each assignment of the run's round `number` (a node once per assignment)."""
    return s.scalars(
        select(m.Assignment.node_id).where(
            m.Assignment.run_id == run_id, m.Assignment.round == number
        )
    )


def flush_verdicts(s: Session) -> None:
    """Send screening's writes (verdict columns, rejected assignments, reputation rows) now, in
    the caller's transaction, so the close reads what screening left."""
    s.flush()


# ------------------------------------------------------------------ settlement


def contribution_facts(c: m.Contribution) -> ContributionFacts:
    """What settlement and verdicts read of a contribution row."""
    return ContributionFacts(
        id=c.id,
        round=c.round,
        node_id=c.node_id,
        status=c.status,
        tokens=c.tokens,
        loss_drop=c.loss_drop,
        audited=bool(c.audited),
        audit_passed=c.audit_passed,
        audit_rate=c.audit_rate,
        claim_seq=c.claim_seq,
        verdict_reason=c.verdict_reason,
        intensity_g_per_kwh=c.intensity_g_per_kwh,
        usefulness=c.usefulness,
    )


def read_settlement(
    s: Session,
    run: m.Run,
    rnd: m.Round,
    cfg: RunConfig,
    version: m.Version,
    escrow: Callable[[], RunEscrow],
    round_seed: Callable[[], m.TrustRound],
) -> tuple[Sequence[m.Contribution], m.TrustRound, RoundFacts]:
    """Everything settling `rnd` reads: its contributions (by node id), the run's escrow, the
    nodes assigned, their reputations and the audit seed (with the rows settlement writes).
    `escrow` (folded from the ledger) and `round_seed` (which draws a seed for a round opened
    before the trust tables existed) are the caller's, called in this order among the reads."""
    rows = round_contributions(s, run.id, rnd.number)
    funds = escrow()
    assigned = frozenset(assigned_node_ids(s, run.id, rnd.number))
    seed_row = round_seed()
    facts = RoundFacts(
        run_id=run.id,
        round=rnd.number,
        attempt=rnd.attempt,
        base_version=rnd.base_version,
        version=version.number,
        val_loss=version.val_loss,
        contributions=tuple(contribution_facts(c) for c in rows),
        assigned=assigned,
        reputations=read_reputations(s, sorted(assigned | {c.node_id for c in rows})),
        escrow_available_units=funds.available_units,
        escrow_funded_units=funds.funded_units,
        budget_rounds=cfg.budget.rounds,
        audit_seed=seed_row.audit_seed,
        audit_commitment=seed_row.commitment,
    )
    return rows, seed_row, facts


def apply_settlement(
    s: Session,
    rows: Sequence[m.Contribution],
    seed_row: m.TrustRound,
    settlement: Settlement,
    clock: Callable[[], float],
) -> None:
    """Write what `settle` decided (not the ledger items): the accepted contributions'
    usefulness and reward, each reputation step in order, the seed's reveal time (each stamped
    by `clock` as it is written)."""
    by_id = {c.id: c for c in rows}
    for update in settlement.contributions:
        c = by_id[update.id]
        c.usefulness, c.reward_units = update.usefulness, update.reward_units
    write_reputations(s, [(step.node_id, step.after) for step in settlement.reputations], clock)
    seed_row.revealed_at = clock()
