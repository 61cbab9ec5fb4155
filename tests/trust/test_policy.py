"""The pure trust rules of live rounds: audit probability, energy floor, harm, selection, pool."""

from __future__ import annotations

import pytest

from gridswarm.config import RunConfig, TrustConfig, parse_run_config
from gridswarm.trust.audit import cheating_advantage
from gridswarm.trust.policy import (
    EXCLUDED,
    audit_probability,
    audit_skip_reason,
    check_energy,
    check_harm,
    energy_floor_time_s,
    energy_floor_wh,
    may_select,
    round_pool_units,
)
from gridswarm.trust.reputation import Reputation, RoundOutcome, update_reputation


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
