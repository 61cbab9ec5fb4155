"""Audit rate and audit selection: how many contributions to replay, and which ones.

Why sampling deters cheating. A node that skips the work saves its cost c (energy, time; in reward
units). If it is not audited it is paid R as if honest; if it is audited (probability p) it gets
nothing and forfeits D (stake, withheld rewards, and the value of its reputation). Cheating pays
(1−p)·R − p·D against R − c for honest work, so it is unprofitable exactly when

    p ≥ c / (R + D).

`audit_rate` applies that bound with a safety factor (c, R and D are estimates), a floor, and
full audits for newcomers. Reputation enters through D: a node whose reputation is worth K future
rounds of reward loses that too when caught, so trusted nodes are audited less — BOINC's adaptive
replication, derived from the payoff rather than guessed.

Which contributions: the hub commits to a secret seed (publishes sha256(seed)) before a round and
reveals it only after all contributions are in; a contribution is audited when
hash(seed, contribution_id) < p. A node cannot know in advance whether it will be checked, and
anyone can re-derive the choice afterwards from the revealed seed.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass

from gridswarm.trust.reputation import Reputation


@dataclass(frozen=True)
class AuditPolicy:
    """Knobs of the audit-rate rule."""

    safety_factor: float = 2.0
    min_rate: float = 0.02
    newcomer_audits: int = 5
    reputation_value_rounds: float = 20.0

    def __post_init__(self) -> None:
        if self.safety_factor < 1:
            raise ValueError(f"safety_factor must be >= 1, got {self.safety_factor}")
        if not 0 <= self.min_rate <= 1:
            raise ValueError(f"min_rate must be in [0, 1], got {self.min_rate}")
        if self.newcomer_audits < 0 or self.reputation_value_rounds < 0:
            raise ValueError("newcomer_audits and reputation_value_rounds must be >= 0")


def break_even_rate(cost_units: float, reward_units: float, forfeit_units: float) -> float:
    """Smallest audit probability at which cheating does not pay: c / (R + D), capped at 1."""
    for name, value in (("cost", cost_units), ("reward", reward_units), ("forfeit", forfeit_units)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}_units must be finite and >= 0, got {value}")
    if cost_units == 0:
        return 0.0
    if reward_units + forfeit_units == 0:
        return 1.0
    return min(1.0, cost_units / (reward_units + forfeit_units))


def cheating_advantage(
    rate: float, cost_units: float, reward_units: float, forfeit_units: float
) -> float:
    """Expected gain of cheating over honest work: c − p·(R + D) (≤ 0 means it does not pay)."""
    return cost_units - rate * (reward_units + forfeit_units)


def forfeit_units(
    reward_units: float, stake_units: float, reputation: Reputation, policy: AuditPolicy
) -> float:
    """What a caught cheater loses besides this round's reward: stake + value of its reputation."""
    return stake_units + reputation.score * policy.reputation_value_rounds * reward_units


def audit_rate(
    cost_units: float,
    reward_units: float,
    stake_units: float,
    reputation: Reputation,
    policy: AuditPolicy | None = None,
) -> float:
    """Probability of replaying this node's contribution."""
    policy = policy or AuditPolicy()
    if reputation.consecutive_valid < policy.newcomer_audits:
        return 1.0
    forfeit = forfeit_units(reward_units, stake_units, reputation, policy)
    rate = policy.safety_factor * break_even_rate(cost_units, reward_units, forfeit)
    return min(1.0, max(policy.min_rate, rate))


def seed_commitment(seed: bytes) -> str:
    """What the hub publishes before a round: sha256(seed) in hex."""
    if len(seed) < 16:
        raise ValueError("audit seed must be at least 16 bytes")
    return hashlib.sha256(seed).hexdigest()


def seed_matches(seed: bytes, commitment: str) -> bool:
    """True when a revealed seed is the one committed to."""
    return hmac.compare_digest(hashlib.sha256(seed).hexdigest(), commitment)


def audit_draw(seed: bytes, contribution_id: str) -> float:
    """Uniform number in [0, 1) fixed by the revealed seed and the contribution id."""
    digest = hmac.new(seed, contribution_id.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_audited(seed: bytes, contribution_id: str, rate: float) -> bool:
    """Whether this contribution is replayed."""
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    return audit_draw(seed, contribution_id) < rate
