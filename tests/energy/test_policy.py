from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridswarm.energy.policy import (
    IntensityBelow,
    NodeConditions,
    NodeEnergyState,
    NodePolicy,
    PriceBelow,
    SurplusCovers,
    TimeWindows,
    parse_node_policy,
    parse_window,
    plan_round,
    step_values,
)
from tests.examples import examples

R = 3600.0  # round duration in these scenarios
NOW = 1_700_000_000.0


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# ---------------------------------------------------------------- node side


def test_rules_each_refuse_with_a_reason():
    c = NodeConditions(
        now_s=NOW,
        draw_w=300,
        intensity_g_per_kwh=250,
        price_per_kwh=0.3,
        surplus_w=100,
        battery_soc_wh=1000,
        battery_capacity_wh=5000,
        battery_max_power_w=3000,
    )
    assert IntensityBelow(300).refuses(c) is None
    assert "250 >= 200" in IntensityBelow(200).refuses(c)
    assert PriceBelow(0.4).refuses(c) is None
    assert "price" in PriceBelow(0.25).refuses(c)
    # battery above a 20 % floor: (1000 - 1000) Wh -> nothing; surplus 100 W < 300 W
    assert "local supply 100 W" in SurplusCovers(battery_floor_frac=0.2).refuses(c)
    # floor 10 %: 500 Wh usable over 15 min = 2000 W, capped by nothing -> covers
    assert SurplusCovers(battery_floor_frac=0.1).refuses(c) is None
    assert IntensityBelow(100).refuses(NodeConditions(now_s=NOW, draw_w=1)) is not None


def test_windows_wrap_midnight_and_days():
    w = parse_window("mon-fri 22:00-06:00")
    assert w.contains(datetime(2024, 5, 20, 23, 0))  # Monday night
    assert w.contains(datetime(2024, 5, 21, 5, 59))  # after midnight belongs to Monday
    assert not w.contains(datetime(2024, 5, 21, 6, 0))
    assert not w.contains(datetime(2024, 5, 25, 23, 0))  # Saturday
    assert w.contains(datetime(2024, 5, 25, 1, 0))  # Saturday 01:00 belongs to Friday night
    assert parse_window("sat,sun 00:00-24:00").contains(datetime(2024, 5, 26, 23, 59))
    assert parse_window("fri-mon 09:00-10:00").days == frozenset({4, 5, 6, 0})


def test_node_policy_all_rules_must_allow():
    policy = parse_node_policy(
        {
            "max_intensity_g_per_kwh": 300,
            "max_price_per_kwh": 0.25,
            "windows": ["09:00-17:00"],
            "timezone": "Europe/Berlin",
        }
    )
    assert len(policy.rules) == 3 and isinstance(policy.rules[-1], TimeWindows)
    noon_berlin = at("2024-05-21T10:00:00")  # 12:00 CEST
    ok = NodeConditions(noon_berlin, 200, intensity_g_per_kwh=200, price_per_kwh=0.2)
    assert policy.evaluate(ok).allowed
    night = NodeConditions(
        at("2024-05-21T20:00:00"), 200, intensity_g_per_kwh=400, price_per_kwh=0.2
    )
    decision = policy.evaluate(night)
    assert not decision.allowed and len(decision.reasons) == 2
    assert NodePolicy().evaluate(night).allowed
    surplus = parse_node_policy({"require_surplus": True, "battery_floor_frac": 0.5})
    assert surplus.allows(NodeConditions(NOW, 300, surplus_w=350))
    assert not surplus.allows(NodeConditions(NOW, 300, surplus_w=-50))


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"max_intensity": 3}, r"energy\.policy\.max_intensity: Extra inputs"),
        ({"max_intensity_g_per_kwh": "low"}, "energy.policy.max_intensity_g_per_kwh"),
        ({"max_intensity_g_per_kwh": -1}, "energy.policy.max_intensity_g_per_kwh"),
        ({"require_surplus": "yes"}, "energy.policy.require_surplus"),
        ({"battery_floor_frac": 0.2}, "energy.policy.battery_floor_frac"),
        ({"require_surplus": True, "battery_floor_frac": 2}, "energy.policy.battery_floor_frac"),
        ({"windows": ["9-17"]}, "energy.policy.windows"),
        ({"windows": ["mon-fry 09:00-17:00"]}, "unknown day"),
        ({"windows": ["09:00-17:00"], "timezone": "Mars/Base"}, "energy.policy.timezone"),
        ({"timezone": "UTC"}, "energy.policy.timezone"),
        ({"max_price_per_kwh": True}, "energy.policy.max_price_per_kwh"),
        (
            {"max_intensity_g_per_kwh": float("inf")},
            "energy.policy.max_intensity_g_per_kwh: .*finite",
        ),
        ({"windows": ["00:00-01:00"] * 65}, "energy.policy.windows"),
    ],
)
def test_policy_parse_errors_name_the_field(cfg, match):
    with pytest.raises(ValueError, match=match):
        parse_node_policy(cfg)


# ---------------------------------------------------------------- hub side


def node(nid: str, intensity, *, tps=100.0, power=100.0, available=True, surplus=None, **kw):
    """`intensity`: a number (flat) or a list of per-round values starting at NOW."""
    values = intensity if isinstance(intensity, list) else [intensity] * 48
    fc = [(NOW + k * R, float(v)) for k, v in enumerate(values)]
    sf = None
    if surplus is not None:
        s = surplus if isinstance(surplus, list) else [surplus] * len(values)
        sf = [(NOW + k * R, float(v)) for k, v in enumerate(s)]
    return NodeEnergyState(nid, "R", tps, power, available, fc, sf, **kw)


def test_agnostic_runs_every_available_node_fully():
    nodes = [node("a", 500), node("b", 50), node("c", 10, available=False)]
    plan = plan_round("agnostic", NOW, nodes, 1e9, NOW + 10 * R, R)
    assert plan.shares == {"a": 1.0, "b": 1.0, "c": 0.0}
    assert plan.deadline_at_risk  # 200 tok/s × 10 rounds << 1e9
    assert plan.expected_tokens == pytest.approx(2 * 100 * R)
    # emissions: 100 W for 1 h at 500 and at 50 g/kWh
    assert plan.expected_emissions_g == pytest.approx(0.1 * 500 + 0.1 * 50)


def test_greedy_green_takes_the_cleanest_nodes_for_the_pace():
    nodes = [node("dirty", 500), node("clean", 50), node("mid", 200)]
    # 10 rounds to the deadline, one in reserve -> 9; need 9 × 100 tok/s × R × 1.0 → 1 node/round
    tokens = 9 * 100 * R / 1.1
    plan = plan_round("greedy-green", NOW, nodes, tokens, NOW + 10 * R, R)
    assert plan.shares["clean"] == pytest.approx(1.0)
    assert plan.shares["dirty"] == 0.0 and plan.shares["mid"] == 0.0
    # twice the pace: clean fully, then mid fully, dirty not
    plan2 = plan_round("greedy-green", NOW, nodes, 2 * tokens, NOW + 10 * R, R)
    assert plan2.shares == pytest.approx({"clean": 1.0, "mid": 1.0, "dirty": 0.0})


def test_forecast_defers_to_the_clean_hours():
    # one node, dirty for three rounds then clean; the work fits in one round
    n = node("a", [500, 480, 450, 80, 90, 400] + [400] * 10)
    plan = plan_round("forecast", NOW, [n], 100 * R * 0.5, NOW + 12 * R, R)
    assert plan.defer and plan.defer_until_s == NOW + 3 * R
    assert all(s == 0 for s in plan.shares.values())
    # the same call at the clean hour runs
    later = node("a", [80, 90, 400] + [400] * 10)
    later = NodeEnergyState(
        "a",
        "R",
        100,
        100,
        True,
        [(NOW + 3 * R + k * R, v) for k, (_, v) in enumerate(later.intensity_forecast)],
    )
    run = plan_round("forecast", NOW + 3 * R, [later], 100 * R * 0.5, NOW + 12 * R, R)
    assert not run.defer and run.shares["a"] == pytest.approx(0.5)


def test_forecast_shifts_in_space_and_prefers_surplus():
    dirty = node("dirty", 600)
    sunny = node("sunny", 600, surplus=150)  # PV covers the full 100 W draw
    clean = node("clean", 100)
    plan = plan_round(
        "forecast", NOW, [dirty, sunny, clean], 100 * R, NOW + 2 * R, R, reserve_rounds=0
    )
    # 2 rounds, 1 round of work: the sunny node (41 g/kWh local) beats the clean grid (100)
    assert plan.shares == pytest.approx({"dirty": 0.0, "sunny": 1.0, "clean": 0.0})
    assert plan.expected_emissions_g == pytest.approx(0.1 * 41)


def test_forecast_runs_everyone_when_the_deadline_is_tight():
    nodes = [node("a", 500), node("b", 100)]
    plan = plan_round("forecast", NOW, nodes, 2 * 100 * R * 5, NOW + 3 * R, R)
    assert plan.deadline_at_risk and plan.shares == {"a": 1.0, "b": 1.0}


def test_forecast_respects_node_availability_forecast():
    # clean only at round 2, but the node says it cannot run then -> it runs now (next cheapest)
    n = node(
        "a",
        [300, 400, 50, 400, 400, 400],
        availability_forecast=[(NOW, True), (NOW + 2 * R, False), (NOW + 3 * R, True)],
    )
    plan = plan_round("forecast", NOW, [n], 100 * R, NOW + 6 * R, R, reserve_rounds=0)
    assert not plan.defer and plan.shares["a"] == pytest.approx(1.0)


def test_plan_round_validation_and_done():
    with pytest.raises(ValueError, match="unknown hub energy policy"):
        plan_round("greenest", NOW, [node("a", 1)], 1, NOW + R, R)
    with pytest.raises(ValueError, match="duplicate node_id"):
        plan_round("agnostic", NOW, [node("a", 1), node("a", 2)], 1, NOW + R, R)
    with pytest.raises(ValueError, match="round_duration_s"):
        plan_round("agnostic", NOW, [node("a", 1)], 1, NOW + R, 0)
    done = plan_round("forecast", NOW, [node("a", 1)], 0, NOW + R, R)
    assert done.shares == {"a": 0.0} and not done.defer
    nobody = plan_round("forecast", NOW, [node("a", 1, available=False)], 10, NOW + 5 * R, R)
    assert nobody.defer and nobody.defer_until_s == NOW + R


def test_step_values_diurnal_persistence():
    pts = [(k * 3600.0, float(k % 24)) for k in range(48)]
    got = step_values(pts, np.array([0.0, 5400.0, 48 * 3600.0 + 7200.0, 100 * 3600.0]))
    assert got.tolist() == [0.0, 1.0, 2.0, 4.0]


@settings(max_examples=examples(25), deadline=None)
@given(
    st.lists(st.lists(st.integers(10, 800), min_size=6, max_size=6), min_size=1, max_size=4),
    st.lists(st.sampled_from([50.0, 100.0, 200.0]), min_size=4, max_size=4),
    st.floats(0.05, 0.9),
)
def test_forecast_plan_is_the_lp_optimum(intensities, speeds, load):
    """The greedy plan equals the linear-programming optimum over (node, round) blocks."""
    from scipy.optimize import linprog

    nodes = [node(f"n{i}", v, tps=speeds[i]) for i, v in enumerate(intensities)]
    rounds = 6
    cap = np.array(
        [[n.tokens_per_s * R * (1.0 if k == 0 else 0.9) for k in range(rounds)] for n in nodes]
    )
    tokens = load * cap.sum()
    plan = plan_round("forecast", NOW, nodes, tokens, NOW + rounds * R, R, reserve_rounds=0)
    # g per token of each (node, round) block, as the planner prices it
    cost = np.array(
        [
            [v / 1000 * n.power_w / 3600 / n.tokens_per_s for v in iv]
            for n, iv in zip(nodes, intensities, strict=True)
        ]
    )
    lp = linprog(
        cost.ravel(),
        A_eq=np.ones((1, cost.size)),
        b_eq=[tokens],
        bounds=list(zip(np.zeros(cap.size), cap.ravel(), strict=True)),
    )
    assert lp.success
    assert plan.planned_emissions_g == pytest.approx(lp.fun, rel=1e-6, abs=1e-9)
    planned = np.array(plan.planned_tokens_by_round)
    assert planned.sum() == pytest.approx(tokens, rel=1e-9)
    round0 = sum(plan.shares[n.node_id] * n.tokens_per_s * R for n in nodes)
    assert round0 == pytest.approx(planned[0], rel=1e-9, abs=1e-6)
    assert plan.defer == (round0 == 0)


def test_a_tiny_remainder_still_gets_work():
    # 50 tokens left of a 3.6e5-token round capacity: a real (small) share, not a deferral
    fc = plan_round("forecast", NOW, [node("a", 100)], 50.0, NOW + 10 * R, R)
    assert not fc.defer and fc.shares["a"] * 100 * R == pytest.approx(50.0)
    # greedy-green keeps its pace: 50 tokens over 9 rounds (one in reserve) plus 10 %
    gg = plan_round("greedy-green", NOW, [node("a", 100)], 50.0, NOW + 10 * R, R)
    assert gg.shares["a"] * 100 * R == pytest.approx(50.0 / 9 * 1.1)


def test_plans_match_the_reference_implementation():
    """The array planner makes the plans the per-node reference implementation made (fixed-seed
    cases, `plan_cases.py`): same nodes, same shares, same deferrals."""
    import json

    from tests.energy.plan_cases import FIXTURES, cases

    golden = json.loads((FIXTURES / "plan_golden.json").read_text())
    now = cases()
    assert len(now) == len(golden)
    for want, got in zip(golden, now, strict=True):
        w, g = want["plan"], got["plan"]
        label = (want["seed"], want["policy"])
        for key in ("policy", "defer", "deadline_at_risk", "reason"):
            assert g[key] == w[key], label
        assert g["shares"].keys() == w["shares"].keys(), label
        for nid, share in w["shares"].items():
            assert g["shares"][nid] == pytest.approx(share, rel=1e-9, abs=1e-12), (label, nid)
        for key in (
            "defer_until_s",
            "expected_tokens",
            "expected_energy_wh",
            "expected_emissions_g",
            "planned_emissions_g",
        ):
            assert g[key] == (w[key] if w[key] is None else pytest.approx(w[key], rel=1e-9)), (
                label,
                key,
            )
        assert g["planned_tokens_by_round"] == pytest.approx(w["planned_tokens_by_round"], rel=1e-9)


def test_cheapest_first_band_equals_the_full_sort(monkeypatch):
    """Above BAND_MIN_BLOCKS only blocks near the cut are sorted; the take is the full sort's
    (ties included: costs are rounded so that many blocks cost the same; some blocks absent)."""
    from gridswarm.energy import policy

    rng = np.random.default_rng(3)
    shape = (1000, 300)
    cost = np.round(rng.gamma(2.0, 100.0, shape), 0)
    cap = rng.choice([0.0, 1e3, 2e3, 4.5e3], shape)
    for frac in (0.01, 0.4, 0.97):
        tokens = frac * cap.sum()
        banded = policy.cheapest_first(cost, cap, tokens)
        monkeypatch.setattr(policy, "BAND_MIN_BLOCKS", 10**9)
        full = policy.cheapest_first(cost, cap, tokens)
        monkeypatch.undo()
        assert banded.sum() == pytest.approx(tokens)
        np.testing.assert_allclose(banded, full, rtol=1e-9, atol=1e-6)
        # the full sort itself: everything cheaper than the dearest block taken is taken whole
        cut = cost[full > 0].max()
        assert np.all(full[(cost < cut) & (cap > 0)] == cap[(cost < cut) & (cap > 0)])


def test_allows_many_agrees_with_allows():
    """The array form of every rule says what the scalar form says, condition by condition."""
    from gridswarm.energy.policy import NodeConditions, parse_node_policy

    policy = parse_node_policy(
        {
            "max_intensity_g_per_kwh": 300,
            "require_surplus": True,
            "battery_floor_frac": 0.3,
            "max_price_per_kwh": 0.25,
            "windows": ["mon-fri 18:00-08:00", "sat,sun 00:00-24:00"],
            "timezone": "Europe/Berlin",
        }
    )
    rng = np.random.default_rng(0)
    n = 400
    c = NodeConditions(
        now_s=1654473600.0 + rng.integers(0, 14 * 96, n) * 900.0,
        draw_w=rng.choice([70.0, 300.0], n),
        intensity_g_per_kwh=rng.uniform(0, 600, n),
        price_per_kwh=rng.uniform(0.1, 0.4, n),
        surplus_w=rng.uniform(-500, 800, n),
        battery_soc_wh=rng.uniform(0, 6400, n),
        battery_capacity_wh=6400.0,
        battery_max_power_w=rng.choice([0.0, 200.0, 5000.0], n),
    )
    many = policy.allows_many(c)
    one = [
        policy.allows(
            NodeConditions(
                now_s=float(c.now_s[i]),
                draw_w=float(c.draw_w[i]),
                intensity_g_per_kwh=float(c.intensity_g_per_kwh[i]),
                price_per_kwh=float(c.price_per_kwh[i]),
                surplus_w=float(c.surplus_w[i]),
                battery_soc_wh=float(c.battery_soc_wh[i]),
                battery_capacity_wh=6400.0,
                battery_max_power_w=float(c.battery_max_power_w[i]),
            )
        )
        for i in range(n)
    ]
    assert many.tolist() == one
    assert 0 < sum(one) < n  # both outcomes occur
    for single in policy.rules:  # each rule alone too
        alone = NodePolicy((single,))
        assert 0 < alone.allows_many(c).sum() < n
