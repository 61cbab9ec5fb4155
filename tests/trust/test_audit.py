"""Audit-rate rule (p >= c/(R+D)), reputation-adapted rate, and seeded audit selection."""

from __future__ import annotations

import pytest

from gridswarm.trust.audit import (
    AuditPolicy,
    audit_draw,
    audit_rate,
    break_even_rate,
    cheating_advantage,
    forfeit_units,
    is_audited,
    seed_commitment,
    seed_matches,
)
from gridswarm.trust.reputation import Reputation, RoundOutcome, update_reputation


def trusted(n: int) -> Reputation:
    rep = Reputation()
    for _ in range(n):
        rep = update_reputation(
            rep, RoundOutcome(delivered=True, audit_passed=True, usefulness=1.0)
        )
    return rep


def test_break_even_rate() -> None:
    assert break_even_rate(10, 100, 0) == pytest.approx(0.1)
    assert break_even_rate(10, 10, 990) == pytest.approx(0.01)
    assert break_even_rate(0, 100, 0) == 0.0 and break_even_rate(5, 0, 0) == 1.0
    assert break_even_rate(500, 100, 0) == 1.0
    with pytest.raises(ValueError, match="cost_units"):
        break_even_rate(-1, 1, 1)


@pytest.mark.parametrize("stake", [0.0, 50.0, 1000.0])
@pytest.mark.parametrize("history", [5, 10, 40])
def test_rate_makes_cheating_unprofitable(stake: float, history: int) -> None:
    cost, reward = 30.0, 100.0
    policy = AuditPolicy()
    rep = trusted(history)
    p = audit_rate(cost, reward, stake, rep, policy)
    forfeit = forfeit_units(reward, stake, rep, policy)
    assert cheating_advantage(p, cost, reward, forfeit) <= 0
    assert p >= policy.min_rate
    # below the break-even rate cheating would pay: the rule is not just "audit everything"
    below = 0.9 * break_even_rate(cost, reward, forfeit)
    assert cheating_advantage(below, cost, reward, forfeit) > 0


def test_rate_falls_with_reputation_and_stake_and_newcomers_are_fully_audited() -> None:
    policy = AuditPolicy(min_rate=0.0)
    assert audit_rate(30, 100, 0, Reputation(), policy) == 1.0
    assert audit_rate(30, 100, 0, trusted(4), policy) == 1.0
    rates = [audit_rate(30, 100, 0, trusted(n), policy) for n in (5, 10, 40)]
    assert rates[0] > rates[1] > rates[2]
    assert audit_rate(30, 100, 1000, trusted(5), policy) < rates[0]
    caught = update_reputation(trusted(40), RoundOutcome(delivered=True, audit_passed=False))
    assert audit_rate(30, 100, 0, caught, policy) == 1.0


def test_seeded_selection_is_reproducible_and_near_rate() -> None:
    seed = bytes(range(32))
    commitment = seed_commitment(seed)
    assert seed_matches(seed, commitment) and not seed_matches(b"x" * 32, commitment)
    ids = [f"run1/round3/node{i}" for i in range(4000)]
    chosen = [i for i in ids if is_audited(seed, i, 0.1)]
    assert 0.08 < len(chosen) / len(ids) < 0.12
    assert chosen == [i for i in ids if is_audited(seed, i, 0.1)]
    other = [i for i in ids if is_audited(b"y" * 32, i, 0.1)]
    assert other != chosen
    assert 0 <= audit_draw(seed, "x") < 1
    assert all(is_audited(seed, i, 1.0) for i in ids[:50])
    assert not any(is_audited(seed, i, 0.0) for i in ids[:50])
    with pytest.raises(ValueError, match="rate"):
        is_audited(seed, "x", 1.5)
    with pytest.raises(ValueError, match="16 bytes"):
        seed_commitment(b"short")


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="safety_factor"):
        AuditPolicy(safety_factor=0.5)
    with pytest.raises(ValueError, match="min_rate"):
        AuditPolicy(min_rate=2)
