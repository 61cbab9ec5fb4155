"""Settling a round (trust/settlement.py `settle`) on hand-built facts: each reward rule, the
reputation steps, the ledger items in order, and properties over random rounds.

That the live path (`HubTrust.settle_round`: read, `settle`, apply) writes the same rows and
ledger as before is the ledger and trust tests' part (tests/ledger, tests/trust/test_live_attacks,
tests/test_engine_harness.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridswarm.hub.states import ContributionStatus as CS
from gridswarm.trust.audit import audit_draw, seed_commitment
from gridswarm.trust.reputation import Reputation, ReputationPolicy
from gridswarm.trust.rewards import RewardPolicy
from gridswarm.trust.settlement import (
    UNFUNDED_NOTE,
    UNSCORED_USEFULNESS,
    ContributionFacts,
    RoundFacts,
    Settlement,
    SettlementPolicy,
    settle,
)
from tests.examples import examples

SEED = bytes(range(32))


def contribution(cid: str, node: str, tokens: int = 100, **kw) -> ContributionFacts:
    return ContributionFacts(
        id=cid, round=3, node_id=node, status=kw.pop("status", CS.ACCEPTED), tokens=tokens, **kw
    )


def round_facts(
    contributions: list[ContributionFacts],
    assigned: set[str] | None = None,
    reputations: dict[str, Reputation] | None = None,
    available: int = 1000,
    funded: int | None = None,
    budget_rounds: int | None = 10,
) -> RoundFacts:
    """Round 3 of a run at base version 0 (so 10 rounds are left of a budget of 10)."""
    return RoundFacts(
        run_id="run-1",
        round=3,
        attempt=0,
        base_version=0,
        version=1,
        val_loss=4.1234567,
        contributions=tuple(sorted(contributions, key=lambda c: c.node_id)),
        assigned=frozenset({c.node_id for c in contributions} if assigned is None else assigned),
        reputations=reputations or {},
        escrow_available_units=available,
        escrow_funded_units=available if funded is None else funded,
        budget_rounds=budget_rounds,
        audit_seed=SEED.hex(),
        audit_commitment=seed_commitment(SEED),
    )


def of_kind(settlement: Settlement, kind: str) -> list[dict]:
    return [payload for k, payload in settlement.items if k == kind]


def test_one_share_per_node_per_round_on_its_first_accepted_contribution() -> None:
    facts = round_facts(
        [contribution("c1", "a"), contribution("c2", "a"), contribution("c3", "b", tokens=200)]
    )
    out = settle(facts)
    assert out.pool_units == 100  # escrow 1000 over the 10 rounds left
    assert out.split.shares == {"a": 50, "b": 50}  # a's weight is both its contributions' tokens
    assert [(u.id, u.reward_units) for u in out.contributions] == [
        ("c1", 50),
        ("c2", 0),
        ("c3", 50),
    ]
    verdicts = of_kind(out, "verdict")
    assert [(v["contribution"], v["reward_units"]) for v in verdicts] == [
        ("c1", 50),
        ("c2", 0),
        ("c3", 50),
    ]
    assert [s.node_id for s in out.reputations] == ["a", "a", "b"]  # a steps once per upload
    assert out.reputations[1].before == out.reputations[0].after
    (reputation,) = of_kind(out, "reputation")
    assert list(reputation["nodes"]) == ["a", "b"]
    assert reputation["nodes"]["a"]["liveness"] == out.reputations[1].after.liveness


def test_pool_is_the_fixed_amount_or_the_escrow_over_the_rounds_left() -> None:
    one = [contribution("c1", "a")]
    fixed = SettlementPolicy(reward_per_round_units=30)
    assert settle(round_facts(one), fixed).split.shares == {"a": 30}
    assert settle(round_facts(one, available=20), fixed).pool_units == 20  # never above escrow
    assert settle(round_facts(one, budget_rounds=None)).pool_units == 1000  # no budget: all


def test_unfunded_run_pays_nothing_and_says_so() -> None:
    out = settle(round_facts([contribution("c1", "a")], available=0, funded=0))
    assert out.pool_units == 0 and out.paid_units() == 0
    (reward,) = of_kind(out, "reward")
    assert reward["note"] == UNFUNDED_NOTE
    assert reward["shares"] == {} and reward["carried_units"] == 0 and reward["escrow_units"] == 0
    assert of_kind(out, "verdict")[0]["reward_units"] == 0
    funded = settle(round_facts([contribution("c1", "a")], available=0, funded=500))
    assert "note" not in of_kind(funded, "reward")[0]  # funded once, spent: no note


def test_rejected_and_dropped_contributions_get_nothing_and_no_verdict() -> None:
    facts = round_facts(
        [
            contribution("c1", "a"),
            contribution("c2", "b", status=CS.REJECTED, verdict_reason="audit mismatch"),
            contribution("c3", "c", status=CS.DROPPED),
        ]
    )
    out = settle(facts)
    assert out.split.shares == {"a": 100}
    assert out.split.unpaid == {"b": "audit mismatch", "c": "rejected"}
    assert [u.id for u in out.contributions] == ["c1"]
    assert [v["contribution"] for v in of_kind(out, "verdict")] == ["c1"]
    # b was struck when screening rejected it; c (dropped by SecAgg) counts as silent
    assert [(s.node_id, s.after.liveness) for s in out.reputations] == [("a", 1.0), ("c", 0.8)]
    close = of_kind(out, "round")[0]
    assert close["accepted"] == 1 and close["rejected"] == 2


def test_assigned_but_silent_nodes_lose_liveness_in_sorted_order() -> None:
    known = Reputation(consecutive_valid=4, audits_passed=4, liveness=1.0, usefulness=0.5)
    facts = round_facts(
        [contribution("c1", "m")],
        assigned={"m", "z-silent", "a-silent"},
        reputations={"z-silent": known},
    )
    out = settle(facts)
    assert [s.node_id for s in out.reputations] == ["m", "a-silent", "z-silent"]
    silent = out.reputations[2]
    assert silent.before == known
    assert silent.after.liveness == pytest.approx(0.8)  # (1 − 0.2)·1 + 0.2·0
    assert silent.after.consecutive_valid == 4
    assert silent.after.score == pytest.approx(4 / 9 * 0.8 * 0.75)  # was 4/9 · 1 · 0.75
    assert out.reputations[1].before == Reputation()  # no row yet: the default
    nodes = of_kind(out, "reputation")[0]["nodes"]
    assert list(nodes) == ["m", "a-silent", "z-silent"] and nodes["a-silent"]["liveness"] == 0.8


def test_usefulness_relative_to_the_median_and_default_for_unscored() -> None:
    facts = round_facts(
        [
            contribution("c1", "a", loss_drop=2.0),  # 0.02 per token
            contribution("c2", "b", loss_drop=1.0),  # 0.01 per token
            contribution("c3", "c"),  # no loss drop (SecAgg): unscored
            contribution("c4", "d", tokens=0, loss_drop=0.5),  # no tokens: unscored
        ],
        reputations={n: Reputation(usefulness=0.9) for n in "abcd"},
    )
    out = settle(facts)
    useful = {u.id: u.usefulness for u in out.contributions}
    assert useful["c1"] == pytest.approx(4 / 3) and useful["c2"] == pytest.approx(2 / 3)
    assert useful["c3"] == useful["c4"] == UNSCORED_USEFULNESS
    assert [v["usefulness"] for v in of_kind(out, "verdict")] == [1.333333, 0.666667, 1.0, 1.0]
    after = {s.node_id: s.after.usefulness for s in out.reputations}
    assert after["c"] == 0.9  # no loss drop: reputation's usefulness untouched
    assert after["d"] == pytest.approx(0.8 * 0.9 + 0.2 * 0.5)  # scored as the default 1.0 / cap 2
    # weights 133⅓ : 66⅔ : 100 (d has no tokens); the left-over unit to a's largest remainder
    assert out.split.shares == {"a": 45, "b": 22, "c": 33}


def test_ledger_items_in_order_and_the_seed_revealed() -> None:
    facts = round_facts(
        [
            contribution("c1", "a", audited=True, audit_passed=True, audit_rate=0.5),
            contribution("c2", "b", audit_rate=0.5),
            contribution("c3", "c", status=CS.REJECTED, audited=True, audit_passed=False),
        ]
    )
    out = settle(facts)
    assert [k for k, _ in out.items] == ["verdict", "verdict", "reward", "reputation", "round"]
    reasons = [v["reason"] for v in of_kind(out, "verdict")]
    assert reasons == ["audited: bit-exact", "not drawn for audit"]
    close = of_kind(out, "round")[0]
    assert close["audit_seed"] == SEED.hex() and close["audit_commitment"] == seed_commitment(SEED)
    assert close["audited"] == {c: round(audit_draw(SEED, c), 6) for c in ("c1", "c3")}
    assert close["val_loss"] == 4.123457 and close["version"] == 1 and close["event"] == "close"


def test_settle_is_pure() -> None:
    reps = {"a": Reputation(liveness=0.5)}
    facts = round_facts([contribution("c1", "a", loss_drop=0.1)], reputations=reps)
    assert settle(facts) == settle(facts)
    assert facts.reputations == {"a": Reputation(liveness=0.5)}  # not moved on in place


contributions_st = st.lists(
    st.tuples(
        st.sampled_from("abcdef"),
        st.sampled_from(list(CS)),
        st.integers(0, 10**7),
        st.none() | st.floats(-5, 5, allow_nan=False),
        st.booleans(),
        st.none() | st.floats(0, 1000, allow_nan=False),
    ),
    max_size=12,
)


@settings(max_examples=examples(200), deadline=None)
@given(
    rows=contributions_st,
    silent=st.sets(st.sampled_from("uvw")),
    available=st.integers(0, 10**15),
    unfunded=st.booleans(),
    budget=st.none() | st.integers(1, 40),
    per_round=st.none() | st.integers(1, 10**12),
    bonus=st.floats(0, 10, allow_nan=False),
)
def test_shares_stay_in_the_pool_one_per_node_verdicts_for_the_accepted(
    rows, silent, available, unfunded, budget, per_round, bonus
) -> None:
    contributions = [
        contribution(
            f"c{i}",
            node,
            tokens,
            status=status,
            loss_drop=loss_drop,
            audited=audited,
            audit_passed=audited or None,
            intensity_g_per_kwh=intensity,
        )
        for i, (node, status, tokens, loss_drop, audited, intensity) in enumerate(rows)
    ]
    facts = round_facts(
        contributions,
        assigned={c.node_id for c in contributions} | silent,
        available=0 if unfunded else available,
        funded=0 if unfunded else available + 1,  # some already paid out
        budget_rounds=budget,
    )
    facts = replace(facts, base_version=min(3, budget - 1) if budget else 3)
    policy = SettlementPolicy(
        rewards=RewardPolicy(low_carbon_bonus=bonus),
        reward_per_round_units=per_round,
        reputation=ReputationPolicy(),
    )
    out = settle(facts, policy)
    accepted = [c for c in facts.contributions if c.status == CS.ACCEPTED]

    assert out.pool_units <= facts.escrow_available_units
    assert out.paid_units() == sum(out.split.shares.values()) <= out.pool_units
    assert sum(out.split.shares.values()) + out.split.carried_units == out.pool_units
    node_of = {c.id: c.node_id for c in facts.contributions}
    paid = Counter(node_of[u.id] for u in out.contributions if u.reward_units)
    assert all(n == 1 for n in paid.values())  # at most one paid contribution per node
    assert set(out.split.shares) <= {c.node_id for c in accepted}
    verdicts = of_kind(out, "verdict")
    assert [v["contribution"] for v in verdicts] == [c.id for c in accepted]
    assert all(v["accepted"] for v in verdicts)
    assert [u.id for u in out.contributions] == [c.id for c in accepted]
    (reward,) = of_kind(out, "reward")
    assert reward["pool_units"] == out.pool_units and ("note" in reward) == unfunded
    assert out.items[-1][0] == "round" and out.items[-1][1]["accepted"] == len(accepted)
    assert {s.node_id for s in out.reputations} >= silent
