"""Reputation per node from audits, usefulness and liveness (pure).

    score = confidence × liveness × (½ + ½·usefulness) × strike_penalty^strikes

- confidence = v / (v + k) with v consecutive clean audits (BOINC's consecutive-valid counter):
  trust is earned by being checked, not by being around.
- liveness: moving average of "delivered the assignment before the deadline".
- usefulness: moving average of the relative usefulness score, capped and scaled to [0, 1].
- a failed audit or detected cheat resets v to 0 and adds a strike; each strike multiplies the score
  by `strike_penalty` for good, so a caught cheater is audited fully again and selected rarely.

The score (in [0, 1]) feeds the scheduler's selection weight and, through the forfeit D, the audit
rate (audit.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ReputationPolicy:
    smoothing: float = 0.2
    confidence_audits: int = 5
    strike_penalty: float = 0.1
    usefulness_cap: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if self.confidence_audits < 1:
            raise ValueError("confidence_audits must be >= 1")
        if not 0 <= self.strike_penalty < 1:
            raise ValueError("strike_penalty must be in [0, 1)")
        if self.usefulness_cap <= 0:
            raise ValueError("usefulness_cap must be > 0")


@dataclass(frozen=True)
class Reputation:
    """A node's track record; `score` is derived from the rest."""

    consecutive_valid: int = 0
    audits_passed: int = 0
    audits_failed: int = 0
    strikes: int = 0
    liveness: float = 1.0
    usefulness: float = 0.5
    score: float = 0.0


@dataclass(frozen=True)
class RoundOutcome:
    """What happened to one node in one round.

    `audit_passed`: None when not audited. `rejected`: the contribution was refused for a detected
    cheat (noise, scaled or copied update, false token or energy claim, forged signature ...) even
    without a replay. `usefulness`: relative score (rewards.usefulness_scores), None if unscored.
    """

    delivered: bool
    audit_passed: bool | None = None
    rejected: bool = False
    usefulness: float | None = None


def reputation_score(rep: Reputation, policy: ReputationPolicy) -> float:
    confidence = rep.consecutive_valid / (rep.consecutive_valid + policy.confidence_audits)
    usefulness = 0.5 + 0.5 * rep.usefulness
    return confidence * rep.liveness * usefulness * policy.strike_penalty**rep.strikes


def update_reputation(
    rep: Reputation, outcome: RoundOutcome, policy: ReputationPolicy | None = None
) -> Reputation:
    """Reputation after one round's outcome."""
    policy = policy or ReputationPolicy()
    a = policy.smoothing
    liveness = (1 - a) * rep.liveness + a * (1.0 if outcome.delivered else 0.0)
    usefulness = rep.usefulness
    if outcome.usefulness is not None:
        if not math.isfinite(outcome.usefulness):
            raise ValueError(f"usefulness must be finite, got {outcome.usefulness}")
        scaled = min(max(outcome.usefulness, 0.0), policy.usefulness_cap) / policy.usefulness_cap
        usefulness = (1 - a) * usefulness + a * scaled
    new = replace(rep, liveness=liveness, usefulness=usefulness)
    if outcome.rejected or outcome.audit_passed is False:
        new = replace(
            new,
            consecutive_valid=0,
            strikes=rep.strikes + 1,
            audits_failed=rep.audits_failed + (outcome.audit_passed is False),
        )
    elif outcome.audit_passed:
        new = replace(
            new,
            consecutive_valid=rep.consecutive_valid + 1,
            audits_passed=rep.audits_passed + 1,
        )
    return replace(new, score=reputation_score(new, policy))


def selection_weight(rep: Reputation, newcomer_weight: float = 0.1) -> float:
    """Scheduler weight: the score, but newcomers (no strikes, no audits yet) still get a chance."""
    if rep.strikes == 0 and rep.audits_passed == 0:
        return max(rep.score, newcomer_weight)
    return rep.score
