"""Settle one closed round (pure): usefulness, the reward split, verdicts, reputations, ledger.

`settle(facts, policy)` takes what the hub read about a round once it has its new version — the
round's contributions (`ContributionFacts`, in the order read: by node id), the nodes assigned to
it, their current reputations, the run's escrow and budget, the revealed audit seed — and decides
everything settlement writes, without SQL, I/O or a clock:

- usefulness of each accepted contribution: its held-out loss drop per token relative to the
  round's median (`rewards.usefulness_scores`); unscored ones (no loss drop or no tokens, e.g.
  SecAgg) get `UNSCORED_USEFULNESS`, so they are paid by tokens alone;
- the round's pool from the escrow (`policy.round_pool_units`) and its exact split
  (`rewards.split_round_pool`); one share per node and round, on the node's first accepted
  contribution in the order read, none on the others;
- ledger items, in the order they are appended: a "verdict" per accepted contribution, the
  "reward" split, "reputation" (when any changed), the round's "close" with the seed revealed;
- reputation steps in the order they are applied: each accepted contribution's node (a node with
  two accepted contributions steps twice), then, sorted, the nodes assigned that delivered
  nothing and were not rejected (their liveness drops).

`hub/trust.py` `HubTrust.settle_round` reads the facts in one place (`hub/store/trust.py`
`read_settlement`), calls `settle`, and writes the `Settlement` in one place (`apply_settlement`:
contribution columns, reputation rows, the seed's reveal time; then the ledger items).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gridswarm.config import RunConfig
from gridswarm.hub.states import ContributionStatus
from gridswarm.trust.audit import audit_draw
from gridswarm.trust.policy import round_pool_units
from gridswarm.trust.reputation import (
    Reputation,
    ReputationPolicy,
    RoundOutcome,
    update_reputation,
)
from gridswarm.trust.rewards import (
    ContributionScore,
    RewardPolicy,
    RoundSplit,
    split_round_pool,
    usefulness_scores,
)

# the usefulness of an accepted contribution that could not be scored (no loss drop, no tokens)
UNSCORED_USEFULNESS = 1.0
UNFUNDED_NOTE = "run not funded: pool 0 (the sponsor funds with `gridswarm run fund`)"
LEDGER_DECIMALS = 6  # floats in settlement's ledger payloads are rounded to this many

LedgerItem = tuple[str, dict[str, Any]]  # (kind, payload): the shape of ledger.log.HubItem


@dataclass(frozen=True)
class ContributionFacts:
    """One contribution row as settlement (and a verdict) reads it."""

    id: str
    round: int
    node_id: str
    status: ContributionStatus
    tokens: int
    loss_drop: float | None = None  # held-out loss before − after applying it alone
    audited: bool = False
    audit_passed: bool | None = None
    audit_rate: float | None = None
    claim_seq: int | None = None  # the node's signed claim on the ledger
    verdict_reason: str | None = None
    intensity_g_per_kwh: float | None = None  # grid intensity of the work (low-carbon bonus)
    usefulness: float | None = None  # as stored: what the split reads for one not accepted

    @property
    def accepted(self) -> bool:
        return self.status == ContributionStatus.ACCEPTED


@dataclass(frozen=True)
class RoundFacts:
    """What settlement needs to know about one round, read once from the hub's rows."""

    run_id: str
    round: int
    attempt: int
    base_version: int
    version: int  # the version the round published
    val_loss: float  # of that version
    contributions: tuple[ContributionFacts, ...]  # every status, ordered by node id
    assigned: frozenset[str]  # nodes holding an assignment of the round (any status)
    reputations: Mapping[str, Reputation]  # current; a node missing here has none yet
    escrow_available_units: int
    escrow_funded_units: int
    budget_rounds: int | None  # the run's round budget (None: unbounded)
    audit_seed: str  # hex, revealed in the close entry
    audit_commitment: str  # sha256 of the seed, put on the ledger when the round opened


@dataclass(frozen=True)
class SettlementPolicy:
    """The run's settings that settlement applies."""

    rewards: RewardPolicy = field(default_factory=RewardPolicy)
    reward_per_round_units: int | None = None  # a fixed pool per round; None: escrow / rounds left
    reputation: ReputationPolicy = field(default_factory=ReputationPolicy)


@dataclass(frozen=True)
class ContributionUpdate:
    """The columns settlement writes on one accepted contribution."""

    id: str
    usefulness: float
    reward_units: int


@dataclass(frozen=True)
class ReputationStep:
    """One reputation update, in the order applied (the row then holds `after`)."""

    node_id: str
    before: Reputation
    after: Reputation


@dataclass(frozen=True)
class Settlement:
    """Everything settling a round writes: contribution columns, reputations, ledger items."""

    pool_units: int
    split: RoundSplit
    contributions: tuple[ContributionUpdate, ...]  # the accepted ones, in the order read
    reputations: tuple[ReputationStep, ...]
    items: tuple[LedgerItem, ...]  # appended in this order

    def paid_units(self) -> int:
        return sum(u.reward_units for u in self.contributions)


def reputation_payload(rep: Reputation) -> dict[str, Any]:
    """A reputation as it goes on the ledger: floats rounded to `LEDGER_DECIMALS` places."""
    return {
        k: round(v, LEDGER_DECIMALS) if isinstance(v, float) else v for k, v in vars(rep).items()
    }


def verdict_payload(run_id: str, c: ContributionFacts) -> dict[str, Any]:
    """The fields every "verdict" ledger entry has (settlement and screening add to them)."""
    return {
        "run_id": run_id,
        "round": c.round,
        "node": c.node_id,
        "contribution": c.id,
        "claim_seq": c.claim_seq,
        "stage": "close",
        "accepted": c.accepted,
        "audited": bool(c.audited),
        "audit_rate": c.audit_rate,
        "audit_passed": c.audit_passed,
        "loss_drop": None if c.loss_drop is None else round(c.loss_drop, LEDGER_DECIMALS),
        "tokens": c.tokens,
    }


def _usefulness(accepted: list[ContributionFacts]) -> dict[str, float]:
    """Relative usefulness per accepted contribution id (unscored: `UNSCORED_USEFULNESS`)."""
    per_token = {
        c.id: c.loss_drop / c.tokens for c in accepted if c.loss_drop is not None and c.tokens > 0
    }
    relative = usefulness_scores(per_token)
    return {c.id: relative.get(c.id, UNSCORED_USEFULNESS) for c in accepted}


def settle(facts: RoundFacts, policy: SettlementPolicy | None = None) -> Settlement:
    """Decide a closed round's settlement from its facts (see the module docstring)."""
    policy = policy or SettlementPolicy()
    contributions = facts.contributions
    accepted = [c for c in contributions if c.accepted]
    usefulness = _usefulness(accepted)

    rounds_left = (facts.budget_rounds or facts.base_version + 1) - facts.base_version
    pool = round_pool_units(
        facts.escrow_available_units, policy.reward_per_round_units, rounds_left
    )
    split = split_round_pool(
        facts.round,
        pool,
        [
            ContributionScore(
                account=c.node_id,
                verified_tokens=c.tokens if c.accepted else 0,
                usefulness=usefulness.get(c.id, c.usefulness) or 0.0,
                intensity_g_per_kwh=c.intensity_g_per_kwh,
                accepted=c.accepted,
                reason=c.verdict_reason or "",
            )
            for c in contributions
        ],
        policy.rewards,
    )
    paid_to: set[str] = set()
    updates: list[ContributionUpdate] = []
    for c in accepted:  # one share per node and round, on its first accepted contribution
        units = split.shares.get(c.node_id, 0) if c.node_id not in paid_to else 0
        paid_to.add(c.node_id)
        updates.append(ContributionUpdate(c.id, usefulness[c.id], units))

    items: list[LedgerItem] = [
        (
            "verdict",
            verdict_payload(facts.run_id, c)
            | {
                "usefulness": round(u.usefulness or 0.0, LEDGER_DECIMALS),
                "reward_units": u.reward_units,
                "reason": c.verdict_reason
                or ("audited: bit-exact" if c.audited else "not drawn for audit"),
            },
        )
        for c, u in zip(accepted, updates, strict=True)
    ]
    reward = split.ledger_payload() | {
        "run_id": facts.run_id,
        "escrow_units": facts.escrow_available_units,
    }
    if facts.escrow_funded_units == 0:
        reward["note"] = UNFUNDED_NOTE
    items.append(("reward", reward))

    current = dict(facts.reputations)
    steps: list[ReputationStep] = []

    def step(node_id: str, outcome: RoundOutcome) -> None:
        before = current.get(node_id, Reputation())
        after = update_reputation(before, outcome, policy.reputation)
        current[node_id] = after
        steps.append(ReputationStep(node_id, before, after))

    for c in accepted:
        step(
            c.node_id,
            RoundOutcome(
                delivered=True,
                audit_passed=c.audit_passed if c.audited else None,
                usefulness=usefulness[c.id] if c.loss_drop is not None else None,
            ),
        )
    delivered = {c.node_id for c in accepted}
    rejected = {c.node_id for c in contributions if c.status == ContributionStatus.REJECTED}
    for node_id in sorted(facts.assigned - delivered - rejected):
        step(node_id, RoundOutcome(delivered=False))
    changed = {s.node_id: reputation_payload(s.after) for s in steps}  # a node's last step
    if changed:
        items.append(
            ("reputation", {"run_id": facts.run_id, "round": facts.round, "nodes": changed})
        )

    seed = bytes.fromhex(facts.audit_seed)
    items.append(
        (
            "round",
            {
                "run_id": facts.run_id,
                "round": facts.round,
                "event": "close",
                "attempt": facts.attempt,
                "base_version": facts.base_version,
                "version": facts.version,
                "val_loss": round(facts.val_loss, LEDGER_DECIMALS),
                "audit_commitment": facts.audit_commitment,
                "audit_seed": facts.audit_seed,
                "audited": {
                    c.id: round(audit_draw(seed, c.id), LEDGER_DECIMALS)
                    for c in contributions
                    if c.audited
                },
                "accepted": len(accepted),
                "rejected": len(contributions) - len(accepted),
            },
        )
    )
    return Settlement(
        pool_units=pool,
        split=split,
        contributions=tuple(updates),
        reputations=tuple(steps),
        items=tuple(items),
    )


def settlement_policy(cfg: RunConfig) -> SettlementPolicy:
    """The settlement policy of a run's settings (`[trust]`)."""
    return SettlementPolicy(
        rewards=RewardPolicy(
            low_carbon_bonus=cfg.trust.low_carbon_bonus,
            reference_intensity_g_per_kwh=cfg.trust.reference_intensity_g_per_kwh,
        ),
        reward_per_round_units=cfg.trust.reward_per_round_units,
    )
