"""Split one round's reward pool by verified tokens × usefulness (× a low-carbon bonus), exactly.

Weights are computed in exact rational arithmetic (floats enter as their exact binary value, so
every machine gets the same split) and the pool, in the token's smallest units, is divided by the
largest-remainder method: everyone gets floor(pool · w / Σw), and the few units left over go to the
largest fractional remainders (ties: account id). The shares therefore add up to the pool exactly,
and no account is ever more than one unit away from its exact proportional share.

Nothing is paid for a rejected contribution (failed audit, detected cheat), for zero verified
tokens, or for usefulness at or below the floor (work that did not lower the held-out loss). If
nobody qualifies, the whole pool is carried (it stays in the run's escrow).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any


@dataclass(frozen=True)
class ContributionScore:
    """What verification concluded about one node's contribution in a round."""

    account: str
    verified_tokens: int
    usefulness: float
    intensity_g_per_kwh: float | None = None
    accepted: bool = True
    reason: str = ""


@dataclass(frozen=True)
class RewardPolicy:
    """How weights are formed.

    `low_carbon_bonus`: extra weight for work on zero-carbon energy (0.2 = +20 %), falling linearly
    to nothing at `reference_intensity_g_per_kwh`. `usefulness_floor`: usefulness at or below it
    earns nothing.
    """

    low_carbon_bonus: float = 0.0
    reference_intensity_g_per_kwh: float = 400.0
    usefulness_floor: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.low_carbon_bonus <= 10 or not math.isfinite(self.low_carbon_bonus):
            raise ValueError(f"low_carbon_bonus must be in [0, 10], got {self.low_carbon_bonus}")
        if not self.reference_intensity_g_per_kwh > 0:
            raise ValueError("reference_intensity_g_per_kwh must be > 0")


@dataclass(frozen=True)
class RoundSplit:
    """The split of one round's pool; `shares` + `carried_units` == `pool_units` exactly."""

    round: int
    pool_units: int
    shares: dict[str, int]
    carried_units: int
    unpaid: dict[str, str] = field(default_factory=dict)

    def ledger_payload(self) -> dict[str, Any]:
        """Payload of the hub's "reward" ledger entry (what balances.py folds)."""
        return {
            "round": self.round,
            "pool_units": self.pool_units,
            "shares": dict(sorted(self.shares.items())),
            "carried_units": self.carried_units,
            "unpaid": dict(sorted(self.unpaid.items())),
        }


def low_carbon_factor(intensity_g_per_kwh: float | None, policy: RewardPolicy) -> Fraction:
    """1 + bonus · max(0, 1 − intensity / reference); 1 when the intensity is unknown."""
    if intensity_g_per_kwh is None or policy.low_carbon_bonus == 0:
        return Fraction(1)
    if not math.isfinite(intensity_g_per_kwh) or intensity_g_per_kwh < 0:
        raise ValueError(f"intensity_g_per_kwh must be finite and >= 0: {intensity_g_per_kwh}")
    clean = max(
        Fraction(0),
        1 - Fraction(intensity_g_per_kwh) / Fraction(policy.reference_intensity_g_per_kwh),
    )
    return 1 + Fraction(policy.low_carbon_bonus) * clean


def reward_weight(c: ContributionScore, policy: RewardPolicy) -> tuple[Fraction, str]:
    """(weight, reason if zero) of one contribution."""
    if not math.isfinite(c.usefulness):
        raise ValueError(f"usefulness of {c.account} must be finite, got {c.usefulness}")
    if c.verified_tokens < 0:
        raise ValueError(f"verified_tokens of {c.account} must be >= 0, got {c.verified_tokens}")
    if not c.accepted:
        return Fraction(0), c.reason or "rejected"
    if c.verified_tokens == 0:
        return Fraction(0), "no verified tokens"
    if c.usefulness <= policy.usefulness_floor:
        return Fraction(0), f"usefulness {c.usefulness:.4g} <= floor {policy.usefulness_floor}"
    weight = (
        c.verified_tokens
        * Fraction(c.usefulness)
        * low_carbon_factor(c.intensity_g_per_kwh, policy)
    )
    return weight, ""


def largest_remainder(total_units: int, weights: Mapping[str, Fraction]) -> dict[str, int]:
    """Integer shares of `total_units` proportional to `weights`, summing to it exactly."""
    if total_units < 0:
        raise ValueError(f"total_units must be >= 0, got {total_units}")
    positive = {k: Fraction(w) for k, w in weights.items() if w > 0}
    if any(w < 0 for w in weights.values()):
        raise ValueError("weights must be >= 0")
    weight_sum = sum(positive.values(), Fraction(0))
    if weight_sum == 0:
        return {}
    quotas = {k: total_units * w / weight_sum for k, w in positive.items()}
    shares = {k: math.floor(q) for k, q in quotas.items()}
    left = total_units - sum(shares.values())
    by_remainder = sorted(quotas, key=lambda k: (-(quotas[k] - shares[k]), k))
    for k in by_remainder[:left]:
        shares[k] += 1
    return shares


def split_round_pool(
    round_index: int,
    pool_units: int,
    contributions: Sequence[ContributionScore],
    policy: RewardPolicy | None = None,
) -> RoundSplit:
    """Split `pool_units` among a round's contributions (one or more per account)."""
    policy = policy or RewardPolicy()
    if pool_units < 0:
        raise ValueError(f"pool_units must be >= 0, got {pool_units}")
    weights: dict[str, Fraction] = {}
    unpaid: dict[str, str] = {}
    for c in contributions:
        weight, reason = reward_weight(c, policy)
        weights[c.account] = weights.get(c.account, Fraction(0)) + weight
        if reason:
            unpaid.setdefault(c.account, reason)
    shares = {k: v for k, v in largest_remainder(pool_units, weights).items() if v > 0}
    unpaid = {k: r for k, r in unpaid.items() if k not in shares}
    for k, w in weights.items():
        if w > 0 and k not in shares:
            unpaid[k] = "share rounds to 0 units"
    return RoundSplit(
        round=round_index,
        pool_units=pool_units,
        shares=shares,
        carried_units=pool_units - sum(shares.values()),
        unpaid=unpaid,
    )


def usefulness_scores(loss_decrease: Mapping[str, float], cap: float = 2.0) -> dict[str, float]:
    """Per-token usefulness relative to the round: loss decrease / median positive decrease.

    `loss_decrease[account]` is eval loss before − after applying that contribution alone, on held-
    out data, per token of work. Relative scores keep the reward independent of how much loss is
    left to gain late in training; the cap stops one lucky batch taking the round. A contribution
    that raised the loss scores 0.
    """
    for account, value in loss_decrease.items():
        if not math.isfinite(value):
            raise ValueError(f"loss decrease of {account} must be finite, got {value}")
    positive = [v for v in loss_decrease.values() if v > 0]
    if not positive:
        return {k: 0.0 for k in loss_decrease}
    median = statistics.median(positive)
    return {k: min(cap, max(0.0, v / median)) for k, v in loss_decrease.items()}
