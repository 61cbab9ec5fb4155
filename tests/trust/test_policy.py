"""The pure trust rules of live rounds: audit probability, energy floor, harm, selection, pool,
the newcomer cap."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridswarm.config import RunConfig, TrustConfig, parse_run_config
from gridswarm.trust.audit import cheating_advantage
from gridswarm.trust.policy import (
    EXCLUDED,
    NEWCOMER_PLACES_FULL,
    audit_probability,
    audit_skip_reason,
    check_energy,
    check_harm,
    energy_floor_time_s,
    energy_floor_wh,
    may_select,
    newcomer_places,
    newcomer_refusal,
    round_pool_units,
)
from gridswarm.trust.reputation import Reputation, RoundOutcome, update_reputation
from tests.examples import examples


def trusted(audits: int = 10) -> Reputation:
    rep = Reputation()
    for _ in range(audits):
        rep = update_reputation(rep, RoundOutcome(delivered=True, audit_passed=True, usefulness=1))
    return rep


def test_newcomers_are_always_audited_and_trust_lowers_the_rate() -> None:
    cfg = TrustConfig()
    assert audit_probability(Reputation(), cfg) == 1.0
    veteran = audit_probability(trusted(), cfg)
    assert cfg.audit_min_rate <= veteran < 0.2
    # the rate deters: cheating has no positive expected gain at that rate (c = 0.3 R)
    forfeit = trusted().score * cfg.reputation_value_rounds
    assert cheating_advantage(veteran, cfg.cost_fraction, 1.0, forfeit) <= 0
    assert audit_probability(trusted(), TrustConfig(audit_max_rate=0.05)) <= 0.05
    assert audit_probability(Reputation(), TrustConfig(audit_min_rate=0, audit_max_rate=0)) == 0


def test_audits_are_skipped_where_the_hub_cannot_replay() -> None:
    assert audit_skip_reason(RunConfig()) is None
    fed = parse_run_config({"data": {"data": "local"}})
    assert "federated" in audit_skip_reason(fed)
    assert "error feedback" in audit_skip_reason(parse_run_config({"comm": {"error_feedback": 1}}))
    secagg = parse_run_config({"privacy": {"secagg": True}, "round": {"quorum": 3}})
    assert "secure aggregation" in audit_skip_reason(secagg)
    off = parse_run_config({"trust": {"audit_max_rate": 0, "audit_min_rate": 0}})
    assert "off" in audit_skip_reason(off)


def test_energy_floor_catches_under_reports_not_idle_nodes() -> None:
    assert energy_floor_wh(2, 10.0, 36.0) == pytest.approx(0.2)
    # a node that idles 90 % of a 10 s round computed ~1 s, as fast as another node's tokens
    compute_s = energy_floor_time_s(10.0, 1000, reference_tokens_per_s=1000.0)
    assert compute_s == 1.0
    honest_wh = 10.0 * 1.0 / 3600
    assert check_energy(honest_wh, 1, 10.0, compute_s, 0.02) is None
    reason = check_energy(honest_wh / 100, 1, 10.0, compute_s, 0.02)
    assert reason and "under-reported" in reason and "meter model" in reason
    assert check_energy(None, 1, 10.0, compute_s, 0.02) is None  # nothing claimed: nothing to check
    assert energy_floor_time_s(2.0, 1000, None) == 2.0
    with pytest.raises(ValueError, match="threads"):
        energy_floor_wh(0, 10.0, 1.0)


def test_harm_and_pool_and_selection() -> None:
    assert check_harm(0.3, 1.0) is None and check_harm(-0.5, 1.0) is None
    assert "raises the held-out loss by 2.000" in check_harm(-2.0, 1.0)
    assert "non-finite" in check_harm(float("nan"), 1.0)
    assert round_pool_units(10_000, None, 3) == 3333
    assert round_pool_units(10_000, 500, 3) == 500
    assert round_pool_units(200, 500, 3) == 200
    assert round_pool_units(0, None, 3) == 0
    cheater = update_reputation(Reputation(), RoundOutcome(delivered=True, rejected=True))
    assert may_select(cheater, [], 10) == EXCLUDED
    assert may_select(Reputation(), [], 1) is None  # a newcomer gets a chance
    assert "higher reputation" in may_select(Reputation(), [trusted()], 1)
    assert may_select(trusted(), [Reputation()], 1) is None


def test_trust_config_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="audit_min_rate"):
        TrustConfig(audit_min_rate=0.5, audit_max_rate=0.1)
    with pytest.raises(ValueError, match=r"trust\.cost_fraction"):
        parse_run_config({"trust": {"cost_fraction": 2}})


def test_newcomer_places_read_as_the_share_is_written() -> None:
    assert newcomer_places(1.0, 64) == 64  # the default: no cap
    assert newcomer_places(0.25, 8) == 2
    assert newcomer_places(0.26, 8) == 3  # rounded up
    assert newcomer_places(0.3, 10) == 3  # 0.3 x 10 is 3.0000000000000004 in floats
    assert newcomer_places(0.1, 10) == 1
    assert newcomer_places(0.7, 10) == 7
    assert newcomer_places(0.001, 10) == 1  # any share above 0 leaves one place
    assert newcomer_places(0.0, 10) == 0
    for bad in (math.nan, math.inf, -0.1, 1.5):
        with pytest.raises(ValueError, match="newcomer cap"):
            newcomer_places(bad, 10)


@settings(max_examples=examples(300), deadline=None)
@given(max_nodes=st.integers(1, 1 << 20), data=st.data())
def test_a_share_of_k_over_n_gives_k_places(max_nodes: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, max_nodes))
    assert newcomer_places(k / max_nodes, max_nodes) == k


def test_the_cap_holds_newcomers_only() -> None:
    assert newcomer_refusal(True, 5, 0) is None  # worked: never held back
    assert newcomer_refusal(False, 1, 2) is None
    reason = newcomer_refusal(False, 2, 2)
    assert reason.startswith(NEWCOMER_PLACES_FULL) and "2 of 2" in reason


@settings(max_examples=examples(300), deadline=None)
@given(
    max_nodes=st.integers(1, 40),
    share=st.floats(0, 1),
    asks=st.lists(st.booleans(), max_size=120),  # who asks, in order: True = has worked
)
def test_never_more_newcomers_than_the_cap_whatever_the_order_of_asks(
    max_nodes: int, share: float, asks: list[bool]
) -> None:
    """A round's asks in any order, decided as the hub does (a full round first, then the
    cap): never-worked places stay within the cap, worked nodes are never refused by it, and
    a newcomer waits only once the newcomer places are taken."""
    places = newcomer_places(share, max_nodes)
    assert 0 <= places <= max_nodes
    newcomers = worked = 0
    for has_worked in asks:
        if newcomers + worked >= max_nodes:  # round full (hub/rounds.py may_take_seat)
            continue
        reason = newcomer_refusal(has_worked, newcomers, places)
        if has_worked:
            assert reason is None
            worked += 1
        elif reason is None:
            newcomers += 1
        else:
            assert reason.startswith(NEWCOMER_PLACES_FULL) and newcomers == places
        assert newcomers <= places
    # no place is left empty but by the cap: every ask took one until the round was full
    assert newcomers == places or newcomers + worked == min(max_nodes, len(asks))


def test_newcomer_share_is_bounded_and_leaves_a_new_hub_able_to_start() -> None:
    base = {"min_nodes": 2, "quorum": 2, "max_nodes": 8}
    cfg = parse_run_config({"round": base | {"max_newcomer_share": 0.25}})
    assert newcomer_places(cfg.round.max_newcomer_share, cfg.round.max_nodes) == 2
    assert parse_run_config({}).round.max_newcomer_share == 1.0  # default: no cap
    for bad in (math.nan, math.inf, -0.5, 1.01, "many"):
        with pytest.raises(ValueError, match=r"round\.max_newcomer_share"):
            parse_run_config({"round": base | {"max_newcomer_share": bad}})
    # 1 newcomer place of 8 cannot open a round that needs 2 nodes on a hub where none worked
    with pytest.raises(ValueError, match="max_newcomer_share: 1 < min_nodes/quorum 2"):
        parse_run_config({"round": base | {"max_newcomer_share": 0.125}})
    with pytest.raises(ValueError, match="max_newcomer_share"):
        parse_run_config({"round": {"quorum": 3, "max_nodes": 10, "max_newcomer_share": 0.2}})
    with pytest.raises(ValueError, match="max_newcomer_share"):  # 0: nobody new, ever
        parse_run_config({"round": {"max_newcomer_share": 0}})
