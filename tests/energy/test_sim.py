from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gridswarm.energy.home import Home, SeriesPower
from gridswarm.energy.policy import parse_node_policy
from gridswarm.energy.series import UniformSeries
from gridswarm.energy.signals import ConstantSignal, TraceSignal
from gridswarm.energy.solar import Battery
from gridswarm.sim.swarm import SimConfig, SimNode, simulate

DAY = 86400.0


def small_swarm() -> list[SimNode]:
    # a grid that is dirty by day and clean at night, a clean constant grid, a sunny home
    hours = np.arange(48)
    swing = np.where((hours % 24 >= 8) & (hours % 24 < 20), 500.0, 100.0)
    swinging = TraceSignal(UniformSeries(0.0, 3600.0, swing), "SWING")
    pv = UniformSeries(0.0, 3600.0, np.where((hours % 24 >= 9) & (hours % 24 < 16), 3000.0, 0.0))
    load = UniformSeries(0.0, 3600.0, np.full(48, 500.0))
    return [
        SimNode("swing", "SWING", 100.0, 300.0, swinging),
        SimNode("dirty", "DIRTY", 100.0, 300.0, ConstantSignal("DIRTY", 600.0)),
        SimNode("clean", "CLEAN", 50.0, 300.0, ConstantSignal("CLEAN", 60.0)),
        SimNode(
            "home",
            "DIRTY",
            100.0,
            300.0,
            ConstantSignal("DIRTY", 600.0),
            home=Home(SeriesPower(pv), SeriesPower(load), Battery(4000.0, 3000.0)),
        ),
        SimNode(
            "office",
            "SWING",
            100.0,
            300.0,
            swinging,
            policy=parse_node_policy({"windows": ["00:00-06:00"]}),
        ),
    ]


@pytest.fixture(scope="module")
def results():
    cfg = SimConfig(
        start_s=0.0,
        deadline_s=2 * DAY,
        tokens_target=0.3 * 450 * 2 * DAY,
        round_duration_s=1800.0,
        forecast_horizon_s=DAY,
    )
    return {p: simulate(p, small_swarm(), cfg) for p in ("agnostic", "greedy-green", "forecast")}


def test_every_policy_meets_target_and_deadline(results):
    for res in results.values():
        assert res.deadline_met, res.policy
        assert res.tokens_done >= 0.3 * 450 * 2 * DAY - 1
        rep = res.report()
        assert rep.total.tokens == pytest.approx(res.tokens_done)
        # timeline bins and records describe the same work and emissions
        assert res.tokens_per_bin.sum() == pytest.approx(res.tokens_done)
        assert res.emissions_g_per_bin.sum() / 1e3 == pytest.approx(rep.total.emissions_kg)
        assert res.energy_wh_per_bin.sum() / 1e3 == pytest.approx(rep.total.energy_kwh)


def test_carbon_aware_policies_beat_agnostic(results):
    base = results["agnostic"].report().total.emissions_kg
    green = results["greedy-green"].report(base * 1e3)
    fc = results["forecast"].report(base * 1e3)
    assert green.reduction_vs_agnostic > 0.3
    assert fc.reduction_vs_agnostic > 0.3
    # forecast uses the sunny home and the night-clean grid more than agnostic does
    assert fc.per_node["home"].local_surplus_share > 0.5
    dirty_fc = fc.per_node["dirty"].tokens if "dirty" in fc.per_node else 0.0
    assert dirty_fc < 0.5 * results["agnostic"].report().per_node["dirty"].tokens


def test_node_policy_pauses_the_office_node(results):
    for res in results.values():
        office = [r for r in res.records if r.node_id == "office"]
        assert not office or (office[0].start_s % DAY) / 3600 < 6.0
    # alone, it works only inside its window (00:00-06:00)
    node = small_swarm()[-1]
    cfg = SimConfig(start_s=0.0, deadline_s=2 * DAY, tokens_target=100 * 8 * 3600.0)
    res = simulate("agnostic", [node], cfg)
    hours = (res.timeline_s % DAY) / 3600
    assert res.tokens_per_bin[hours >= 6.0].sum() == 0
    assert res.tokens_done >= cfg.tokens_target


def test_every_round_delivers_its_plan():
    """Regression: the hub planned a round as training + sync overhead while nodes trained only
    the training part, so each round delivered ~97 % of the plan and runs of >= 1,000 nodes
    missed the deadline in a tail of mini-rounds. Now a round delivers what was planned, up to
    the hub's rounding of each node's work to whole inner steps (`plan_inner_steps`)."""
    nodes = small_swarm()[:4]
    cfg = SimConfig(
        start_s=0.0, deadline_s=DAY, tokens_target=0.5 * 350 * DAY, forecast_horizon_s=DAY
    )
    for policy in ("greedy-green", "forecast"):
        res = simulate(policy, nodes, cfg, keep_plans=True)
        worked = [p for p in res.plans if not p.defer]
        assert len(worked) == res.rounds
        planned = sum(p.expected_tokens for p in worked)
        assert res.tokens_done == pytest.approx(planned, rel=1e-3)
        assert res.deadline_met and res.replans == 0 and res.missed == 0


def test_a_thousand_nodes_meet_the_deadline():
    """The case that failed: >= 1,000 nodes, a tight load, the green policies finish in time and
    without a tail of mini-rounds."""
    hours = np.arange(48)
    swing = TraceSignal(UniformSeries(0.0, 3600.0, np.where(hours % 24 < 12, 500.0, 80.0)), "SWING")
    flat = ConstantSignal("FLAT", 300.0)
    nodes = [
        SimNode(f"n{i:04d}", "X", 100.0 + i % 7, 300.0, swing if i % 2 else flat)
        for i in range(1200)
    ]
    capacity = sum(n.tokens_per_s for n in nodes) * DAY * 1800 / 1860
    cfg = SimConfig(
        start_s=0.0, deadline_s=DAY, tokens_target=0.6 * capacity, forecast_horizon_s=DAY
    )
    for policy in ("greedy-green", "forecast"):
        res = simulate(policy, nodes, cfg)
        assert res.deadline_met, policy
        assert res.rounds + res.deferrals <= DAY // 1860 + 1, policy


def test_forecast_defers_when_everything_is_dirty():
    hours = np.arange(24)
    sig = TraceSignal(UniformSeries(0.0, 3600.0, np.where(hours < 12, 800.0, 50.0)), "X")
    nodes = [SimNode("a", "X", 100.0, 200.0, sig)]
    cfg = SimConfig(
        start_s=0.0,
        deadline_s=DAY,
        tokens_target=100 * 4 * 3600,
        round_duration_s=1800.0,
        round_overhead_s=0.0,
        forecast_horizon_s=DAY,
    )
    fc = simulate("forecast", nodes, cfg)
    ag = simulate("agnostic", nodes, cfg)
    assert fc.deferrals > 0 and fc.deadline_met
    assert min(r.start_s for r in fc.records) >= 12 * 3600
    assert fc.report().total.emissions_kg < 0.1 * ag.report().total.emissions_kg


def test_bench_scenario_builds(energy_data: Path):
    from gridswarm.sim.scenario import build_swarm

    nodes = build_swarm(energy_data)
    assert len(nodes) >= 24
    assert len({n.region for n in nodes}) >= 6
    assert sum(n.home is not None for n in nodes) >= len(nodes) // 3
    for n in nodes:  # every signal answers on the simulated calendar
        assert 0 < n.signal.current(1654473600.0).intensity_g_per_kwh < 1000


def test_oracle_is_a_floor_and_exact_on_a_known_case():
    """The perfect-foresight optimum: on one node whose grid is clean half the day it trains only
    in clean hours; on a swarm without batteries no policy beats it."""
    from gridswarm.sim.swarm import oracle

    hours = np.arange(48)
    sig = TraceSignal(UniformSeries(0.0, 3600.0, np.where(hours % 24 < 12, 800.0, 50.0)), "X")
    node = SimNode("a", "X", 100.0, 200.0, sig)
    cfg = SimConfig(start_s=0.0, deadline_s=DAY, tokens_target=100 * 4 * 3600.0)
    best = oracle([node], cfg)
    # 4 h of training at 200 W on the 50 g/kWh grid
    assert best.emissions_g == pytest.approx(4 * 200 * 50 / 1000)
    assert best.tokens == pytest.approx(cfg.tokens_target) and best.feasible
    nodes = [n for n in small_swarm() if n.home is None]
    cfg = SimConfig(
        start_s=0.0, deadline_s=2 * DAY, tokens_target=0.3 * 350 * 2 * DAY, forecast_horizon_s=DAY
    )
    floor = oracle(nodes, cfg)
    assert floor.method == "knapsack"
    for policy in ("agnostic", "greedy-green", "forecast"):
        res = simulate(policy, nodes, cfg)
        assert res.report().total.emissions_kg * 1e3 >= floor.emissions_g * (1 - 1e-9), policy
    # with a battery home the floor is an LP relaxation, still below every policy
    nodes = small_swarm()
    floor = oracle(nodes, cfg)
    assert floor.method == "lp" and floor.emissions_g > 0
    for policy in ("agnostic", "greedy-green", "forecast"):
        res = simulate(policy, nodes, cfg)
        assert res.report().total.emissions_kg * 1e3 >= floor.emissions_g, policy


def test_the_round_engine_closes_replans_and_drops_late_work():
    """The simulator's rounds are decided by the hub's engine (`rounds.decide`): a node its own
    policy pauses mid-round misses the round's deadline, its work is energy spent but no tokens;
    with a quorum the others' round closes at the deadline, without one it is re-planned."""
    flat = ConstantSignal("FLAT", 300.0)
    steady = SimNode("steady", "FLAT", 100.0, 300.0, flat)
    # allowed only in the first 40 minutes of each day: starts a 30-min round, cannot finish it
    # the second time (the first round starts at 00:00 and ends at 00:30, the second at 00:31)
    short = SimNode(
        "short", "FLAT", 100.0, 300.0, flat, policy=parse_node_policy({"windows": ["00:00-00:40"]})
    )
    cfg = SimConfig(
        start_s=0.0,
        deadline_s=DAY,
        tokens_target=100 * 4 * 3600.0,
        round_duration_s=1800.0,
        step_s=300.0,
        forecast_horizon_s=DAY,
    )
    res = simulate("agnostic", [steady, short], cfg)
    assert res.deadline_met and res.missed >= 1 and res.replans == 0
    rep = res.report()
    late = rep.per_node["short"]
    # "short" trained two rounds' worth of time at most, but only one of them counted
    assert late.tokens == pytest.approx(100.0 * 1800.0, rel=1e-3)
    assert late.energy_kwh * 1e3 > 300.0 * 1800.0 / 3600.0 * 1.05
    # the same swarm where a round needs both nodes: the round with the late node is re-planned
    # (its upload waits for "short", whose policy lets it run again only the next day)
    both = simulate("agnostic", [steady, short], replace(cfg, quorum=2))
    assert both.replans >= 1 and both.deferrals > 0
    assert not both.deadline_met and both.finished_s > DAY  # one round a day
    assert both.rounds == 4 and both.report().per_node["short"].tokens == pytest.approx(
        4 * 100.0 * 1800.0, rel=1e-3
    )
