"""Reward split: exact sums, proportionality, exclusions, low-carbon bonus, determinism."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridswarm.trust.rewards import (
    ContributionScore,
    RewardPolicy,
    largest_remainder,
    low_carbon_factor,
    split_round_pool,
    usefulness_scores,
)
from tests.examples import examples


def test_split_is_proportional_to_tokens_times_usefulness() -> None:
    split = split_round_pool(
        4,
        1_000_000,
        [
            ContributionScore("a", 1000, 1.0),
            ContributionScore("b", 3000, 1.0),
            ContributionScore("c", 2000, 0.5),
        ],
    )
    assert split.shares == {"a": 200_000, "b": 600_000, "c": 200_000}
    assert split.carried_units == 0 and split.unpaid == {}
    payload = split.ledger_payload()
    assert payload["round"] == 4 and sum(payload["shares"].values()) == payload["pool_units"]


def test_rejected_useless_and_idle_contributions_earn_nothing() -> None:
    split = split_round_pool(
        0,
        999,
        [
            ContributionScore("honest", 500, 1.0),
            ContributionScore("noise", 500, 1.0, accepted=False, reason="audit mismatch"),
            ContributionScore("harmful", 500, -0.3),
            ContributionScore("idle", 0, 1.0),
        ],
    )
    assert split.shares == {"honest": 999}
    assert split.unpaid["noise"] == "audit mismatch"
    assert "usefulness" in split.unpaid["harmful"] and split.unpaid["idle"] == "no verified tokens"


def test_nobody_qualifies_carries_the_pool() -> None:
    split = split_round_pool(1, 500, [ContributionScore("x", 10, 0.0)])
    assert split.shares == {} and split.carried_units == 500


def test_largest_remainder_breaks_ties_by_account() -> None:
    assert largest_remainder(10, {"b": Fraction(1), "a": Fraction(1), "c": Fraction(1)}) == {
        "a": 4,
        "b": 3,
        "c": 3,
    }
    assert largest_remainder(0, {"a": Fraction(1)}) == {"a": 0}
    with pytest.raises(ValueError, match=">= 0"):
        largest_remainder(-1, {"a": Fraction(1)})


@settings(max_examples=examples(150), deadline=None)
@given(
    pool=st.integers(0, 10**30),
    rows=st.lists(
        st.tuples(st.integers(0, 10**9), st.floats(-1, 5, allow_nan=False), st.booleans()),
        min_size=1,
        max_size=25,
    ),
)
def test_shares_add_up_exactly_and_stay_within_one_unit(pool, rows) -> None:
    contributions = [
        ContributionScore(f"n{i}", tokens, useful, accepted=ok)
        for i, (tokens, useful, ok) in enumerate(rows)
    ]
    split = split_round_pool(0, pool, contributions)
    assert sum(split.shares.values()) + split.carried_units == pool
    weights = {
        c.account: c.verified_tokens * Fraction(c.usefulness)
        for c in contributions
        if c.accepted and c.verified_tokens > 0 and c.usefulness > 0
    }
    total = sum(weights.values())
    if total == 0:
        assert split.carried_units == pool
        return
    assert split.carried_units == 0
    for account, w in weights.items():
        assert abs(split.shares.get(account, 0) - pool * w / total) < 1


def test_split_is_independent_of_input_order() -> None:
    rng = random.Random(7)
    contributions = [
        ContributionScore(f"n{i}", rng.randint(1, 10**6), rng.random()) for i in range(40)
    ]
    a = split_round_pool(0, 10**18 + 7, contributions)
    b = split_round_pool(0, 10**18 + 7, list(reversed(contributions)))
    assert a == b


def test_low_carbon_bonus() -> None:
    policy = RewardPolicy(low_carbon_bonus=0.5, reference_intensity_g_per_kwh=400)
    assert low_carbon_factor(0.0, policy) == Fraction(3, 2)
    assert low_carbon_factor(200.0, policy) == Fraction(5, 4)
    assert low_carbon_factor(800.0, policy) == 1 and low_carbon_factor(None, policy) == 1
    split = split_round_pool(
        0,
        2_500,
        [
            ContributionScore("solar", 100, 1.0, intensity_g_per_kwh=0.0),
            ContributionScore("coal", 100, 1.0, intensity_g_per_kwh=900.0),
        ],
        policy,
    )
    assert split.shares == {"solar": 1_500, "coal": 1_000}
    with pytest.raises(ValueError, match="low_carbon_bonus"):
        RewardPolicy(low_carbon_bonus=-1)
    with pytest.raises(ValueError, match="intensity"):
        low_carbon_factor(-5.0, policy)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="usefulness of a"):
        split_round_pool(0, 10, [ContributionScore("a", 1, float("nan"))])
    with pytest.raises(ValueError, match="verified_tokens of a"):
        split_round_pool(0, 10, [ContributionScore("a", -1, 1.0)])
    with pytest.raises(ValueError, match="pool_units"):
        split_round_pool(0, -10, [])


def test_usefulness_scores_relative_to_median_and_capped() -> None:
    scores = usefulness_scores({"a": 0.01, "b": 0.02, "c": 0.03, "d": -0.01, "e": 1.0})
    assert scores["c"] == pytest.approx(1.2) and scores["b"] == pytest.approx(0.8)
    assert scores["d"] == 0.0 and scores["e"] == 2.0
    assert usefulness_scores({"a": -1.0}) == {"a": 0.0}
    with pytest.raises(ValueError, match="finite"):
        usefulness_scores({"a": float("inf")})
