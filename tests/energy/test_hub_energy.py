"""The live hub's energy decisions and accounting (hub/energy.py) on small fixed scenarios whose
best answers are known by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from gridswarm.config import ConfigError, EnergyConfig, parse_run_config
from gridswarm.db import Base
from gridswarm.energy.policy import LOCAL_PV_INTENSITY_G_PER_KWH
from gridswarm.energy.signals import ConstantSignal
from gridswarm.hub.energy import (
    QUORUM_SHARE,
    ContributionRow,
    LiveNode,
    Participant,
    account,
    check_energy,
    decide_work,
    format_run_report,
    load_hub_signals,
    node_state,
    round_timing,
    run_report_json,
    signal_intensity,
    window_s,
)
from gridswarm.hub.server import alembic

NOW = 1_780_000_000.0
COMPUTE_S, WALL_S = 1.0, 2.0  # a round: 1 s of training at full speed, 2 s of wall time
TPS = 1000.0  # tokens/s of every node here: a full round is 1000 tokens


def node(node_id: str, g: float | list[tuple[float, float]], **report) -> LiveNode:
    forecast = g if isinstance(g, list) else [(NOW, g)]
    return LiveNode(node_id, TPS, "R", {"intensity_forecast": forecast, "power_w": 100.0, **report})


def decide(policy: str, me: str, nodes, *, remaining=5000.0, rounds=11, quorum=1, now=NOW):
    """Decision with `rounds` whole rounds of wall time to the deadline."""
    energy = EnergyConfig(policy=policy, deadline_s=1.0)
    return decide_work(
        energy,
        me,
        nodes,
        now,
        tokens_remaining=remaining,
        deadline_at_s=NOW + rounds * WALL_S,
        compute_s=COMPUTE_S,
        wall_s=WALL_S,
        quorum=quorum,
    )


def test_agnostic_gives_everyone_a_full_share_and_keeps_the_window():
    nodes = [node("a", 50), node("b", 600, availability_forecast=[(NOW, True), (NOW + 30, False)])]
    assert decide("agnostic", "a", nodes).share == 1.0
    b = decide("agnostic", "b", nodes)
    assert (b.share, b.window_s, b.plan) == (1.0, 30.0, None)


def test_greedy_green_gives_the_pace_to_the_cleanest_node():
    # 11 rounds to the deadline, one kept in reserve: 10 rounds for 5000 tokens -> 500 a round,
    # plus the 10 % margin = 550 tokens = 0.55 of the clean node's round; the dirty one waits
    nodes = [node("clean", 50), node("dirty", 600)]
    clean, dirty = decide("greedy-green", "clean", nodes), decide("greedy-green", "dirty", nodes)
    assert clean.share == pytest.approx(0.55)
    assert dirty.share == 0.0 and 0.5 <= dirty.retry_after_s <= 5.0
    # behind pace (capacity of both for the rounds left < the target): everyone runs fully
    late = decide("greedy-green", "dirty", nodes, remaining=25_000)
    assert late.share == 1.0 and late.plan.deadline_at_risk


def test_greedy_green_fills_the_quorum_with_the_next_cleanest():
    nodes = [node("clean", 50), node("mid", 200), node("dirty", 600)]
    assert decide("greedy-green", "mid", nodes, quorum=2).share == QUORUM_SHARE
    assert decide("greedy-green", "dirty", nodes, quorum=2).share == 0.0


def test_a_paused_node_is_planned_around_but_the_asking_node_counts_as_available():
    nodes = [node("clean", 50, available=False), node("dirty", 600)]
    assert decide("greedy-green", "dirty", nodes).share == pytest.approx(0.55)
    # the clean node's last report said "paused", but it is asking now: it may run
    assert decide("greedy-green", "clean", nodes).share == pytest.approx(0.55)


def test_forecast_defers_to_the_clean_hours_inside_the_deadline():
    # dirty now, clean from round 3 on: the whole 5000 tokens fit in the clean rounds
    shift = [(NOW, 500.0), (NOW + 3 * WALL_S, 20.0)]
    nodes = [node("a", shift)]
    d = decide("forecast", "a", nodes)
    assert d.share == 0.0 and d.plan.defer
    assert d.plan.defer_until_s == NOW + 3 * WALL_S
    assert d.retry_after_s == pytest.approx(3 * WALL_S - 1.0 if 3 * WALL_S < 5 else 5.0)
    # close to the deadline there is no cleaner round left to wait for: it runs now
    assert decide("forecast", "a", nodes, rounds=2, remaining=900).share == pytest.approx(0.9)


def simulate(policy: str, forecast, remaining: float, rounds: int) -> tuple[float, list[float]]:
    """Drive one node with the pure decision on a virtual clock; (tokens left, work times)."""
    nodes = [node("a", forecast)]
    now, deadline, worked = NOW, NOW + rounds * WALL_S, []
    for _ in range(1000):
        if remaining <= 0 or now > deadline + 10 * WALL_S:
            break
        energy = EnergyConfig(policy=policy, deadline_s=1.0)
        d = decide_work(
            energy,
            "a",
            nodes,
            now,
            tokens_remaining=remaining,
            deadline_at_s=deadline,
            compute_s=COMPUTE_S,
            wall_s=WALL_S,
        )
        if d.share > 0:
            remaining -= d.share * TPS * COMPUTE_S
            worked.append(now)
            now += WALL_S
        else:
            now += d.retry_after_s
    return remaining, worked


def test_forecast_never_defers_past_the_deadline():
    # cleaner energy exists only after the deadline: deferring would be forever; it must run
    later = [(NOW, 500.0), (NOW + 40 * WALL_S, 10.0)]
    left, worked = simulate("forecast", later, remaining=8000, rounds=12)
    assert left <= 1e-6 and max(worked) < NOW + 12 * WALL_S
    # with a clean window inside the deadline every round is trained (mostly) in it
    window = [(NOW, 500.0), (NOW + 5 * WALL_S, 20.0), (NOW + 10 * WALL_S, 500.0)]
    left, worked = simulate("forecast", window, remaining=4000, rounds=14)
    assert left <= 1e-6
    middles = [t + WALL_S / 2 for t in worked]
    assert all(NOW + 5 * WALL_S <= t <= NOW + 10 * WALL_S for t in middles), worked
    # agnostic runs at once, whatever the forecast
    left, worked = simulate("agnostic", window, remaining=4000, rounds=14)
    assert left <= 1e-6 and worked[0] == NOW


def test_hub_forecast_wins_and_speed_and_power_follow_the_duty_cycle():
    n = LiveNode("a", 1000.0, "DE", {"intensity_forecast": [(NOW, 300.0)], "power_w": 80.0}, None)
    s = node_state(n, NOW, default_intensity_g_per_kwh=475.0, duty=0.25)
    assert (s.tokens_per_s, s.power_w, s.intensity_forecast) == (250.0, 20.0, [(NOW, 300.0)])
    hub = LiveNode("a", 1000.0, "DE", n.report, [(NOW, 120.0)])
    assert node_state(hub, NOW, default_intensity_g_per_kwh=475.0).intensity_forecast == [
        (NOW, 120.0)
    ]
    silent = node_state(LiveNode("b", 10.0), NOW, default_intensity_g_per_kwh=475.0)
    assert silent.available and silent.intensity_forecast == [(NOW, 475.0)]


def test_round_timing_and_window():
    cfg = parse_run_config(
        {"train": {"inner_steps": 50, "seq_len": 10, "batch_size": 2}, "round": {"deadline_s": 30}}
    )
    assert round_timing(cfg, fastest_tokens_per_s=100.0) == (10.0, 12.0)  # 1000 tokens / 100
    assert round_timing(cfg, fastest_tokens_per_s=10.0) == (30.0, 30.0)  # capped by the deadline
    forecast = [(NOW - 5, False), (NOW + 10, True), (NOW + 20, False)]
    assert window_s(forecast, NOW) == 20.0 and window_s(None, NOW) is None


def test_green_policies_need_a_deadline_and_a_token_target():
    with pytest.raises(ConfigError, match="deadline_s is required"):
        parse_run_config({"energy": {"policy": "forecast"}})
    cfg = parse_run_config({"energy": {"policy": "greedy-green", "deadline_s": 60}})
    with pytest.raises(ValueError, match=r"budget\.tokens"):
        check_energy(cfg)
    check_energy(parse_run_config({}))  # agnostic needs nothing


def test_accounting_prefers_the_hub_signal_then_the_node_then_the_default():
    hub = account(10.0, 300.0, 0.25, 100.0, 475.0)
    assert (hub.intensity_source, hub.intensity_g_per_kwh) == ("hub", 100.0)
    local_g = 2.5 * LOCAL_PV_INTENSITY_G_PER_KWH
    assert hub.emissions_g == pytest.approx((7.5 * 100.0 + local_g) / 1e3)
    assert account(10.0, 300.0, None, None, 475.0).emissions_g == pytest.approx(3.0)
    default = account(10.0, None, None, None, 475.0)
    assert (default.intensity_source, default.emissions_g) == ("default", pytest.approx(4.75))
    assert account(None, 300.0, None, None, 475.0).emissions_g is None


def row(node_id, tokens, energy_wh, g, source="node", share=0.0, t=NOW) -> ContributionRow:
    region = node_id.upper()
    return ContributionRow(node_id, region, 0, t, 10.0, tokens, energy_wh, g, source, share)


def test_report_totals_are_sums_and_the_counterfactual_is_known():
    # the clean node did all 2000 tokens in 20 s at 36 W (0.2 Wh); the dirty one nothing. Flat
    # out, both (same speed from its probe, same power) would have taken 10 s each:
    # 0.1 Wh at 50 g/kWh + 0.1 Wh at 650 g/kWh = 0.07 g
    rows = [row("clean", 1000, 0.1, 50.0), row("clean", 1000, 0.1, 50.0, t=NOW + 10)]
    people = [
        Participant("clean", "c", "CLEAN", 100.0, 36.0, 50.0),
        Participant("dirty", "d", "DIRTY", 100.0, 36.0, 650.0),
    ]
    report = run_report_json("r1", "greedy-green", rows, people, NOW, lambda region, t: None, 475.0)
    assert report["total"]["tokens"] == 2000 and report["total"]["energy_kwh"] == 0.2e-3
    assert report["total"]["emissions_kg"] == pytest.approx(0.2 * 50.0 / 1e6)
    assert report["agnostic_emissions_kg"] == pytest.approx(0.07e-3)
    assert report["reduction_vs_agnostic"] == pytest.approx(1 - 0.01 / 0.07)
    assert [n["id"] for n in report["nodes"]] == ["clean"]
    # the hub's signal, where it has one, is what the counterfactual charges
    hub = run_report_json("r1", "x", rows, people, NOW, lambda r, t: 0.0, 475.0)
    assert hub["agnostic_emissions_kg"] == 0.0 and hub["reduction_vs_agnostic"] is None
    text = format_run_report(report, {"epsilon": 1.25, "delta": 1e-5, "epsilon_budget": 8.0})
    assert "agnostic counterfactual" in text and "epsilon 1.25" in text and "c " in text


def test_unmetered_contributions_are_counted_but_not_summed():
    rows = [row("a", 100, 0.5, 100.0), row("a", 100, None, None)]
    report = run_report_json("r", "agnostic", rows, [], NOW, lambda r, t: None, 475.0)
    assert report["unmetered"] == 1 and report["total"]["contributions"] == 1
    assert report["intensity_sources"] == {"node": 1}


def test_report_says_what_a_default_intensity_means():
    rows = [row("a", 100, 0.5, 475.0, source="default") for _ in range(30)]
    rows.append(row("b", 100, 0.5, 80.0, source="hub"))
    report = run_report_json("r", "agnostic", rows, [], NOW, lambda r, t: None, 475.0)
    text = format_run_report(report)
    line = next(x for x in text.splitlines() if x.startswith("intensity source"))
    assert "30 contributions at the default 475 g/kWh (neither hub nor node had a signal)" in line
    assert "1 contribution from the hub's own signal for the node's region" in line


def test_hub_signals_file_and_intensity(tmp_path: Path):
    good = tmp_path / "signals.toml"
    good.write_text('[FR]\nkind = "constant"\nintensity_g_per_kwh = 56\n')
    signals = load_hub_signals(good)
    assert signal_intensity(signals["FR"], NOW, NOW + 600) == 56.0
    assert signal_intensity(None, NOW, NOW + 1) is None
    bad = tmp_path / "bad.toml"
    bad.write_text('[DE]\nkind = "trace"\n')
    with pytest.raises(ValueError, match=r"region DE: energy\.signal\.path: Field required"):
        load_hub_signals(bad)
    assert signal_intensity(ConstantSignal("X", 10.0), NOW, NOW) == 10.0


def energy_columns(engine) -> set[str]:
    return {c["name"] for t in ("nodes", "contributions") for c in inspect(engine).get_columns(t)}


def test_migration_0003_adds_the_energy_columns(tmp_path: Path):
    engine = create_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    alembic(engine, "upgrade", "head")
    mine = {"energy_json", "intensity_g_per_kwh", "intensity_source", "emissions_g"}
    mine |= {"local_surplus_share"}
    columns = energy_columns(engine)
    assert mine <= columns
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diffs if any(name in repr(d) for name in mine)] == []
    alembic(engine, "downgrade", "0002_ledger")
    columns = energy_columns(engine)
    assert not mine & columns
