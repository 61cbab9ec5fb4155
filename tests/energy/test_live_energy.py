"""Energy in live rounds: a real hub process and real node processes on 127.0.0.1.

- every contribution carries metered energy (method "model" here), the node's region, the
  intensity at its region and time (the hub's own signal where it has one) and its emissions;
- a node whose policy flips (a looping 1 s trace: clean, dirty, clean, ...) pauses and resumes
  by itself, and takes work only while its grid is clean;
- on the same two nodes, `greedy-green` puts the work on the clean node where `agnostic`
  splits it evenly;
- the report's totals are the sums of the stored contributions, and `gridswarm run report` runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from gridswarm.cli import app
from gridswarm.hub import models as m
from gridswarm.hub.server import make_engine
from gridswarm.identity import Identity
from gridswarm.node.client import HubClient
from gridswarm.swarm import Swarm
from tests.conftest import tiny_run, wait_for

pytestmark = pytest.mark.slow

CLEAN_G, DIRTY_G = 50.0, 600.0


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def node_toml(path: Path, region: str, intensity: float) -> Path:
    return write(
        path,
        f'[energy]\nregion = "{region}"\n'
        f'signal = {{ kind = "constant", intensity_g_per_kwh = {intensity} }}\n',
    )


def rows(swarm: Swarm, table, **where):
    with Session(make_engine(swarm.db_url)) as s:
        query = select(table)
        for key, value in where.items():
            query = query.where(getattr(table, key) == value)
        return s.scalars(query).all()


def finished(client: HubClient, run_id: str):
    status = client.run_status(run_id)
    return status if status["status"] == "finished" else None


def token_share(contributions, node_id: str) -> float:
    total = sum(c.tokens for c in contributions)
    return sum(c.tokens for c in contributions if c.node_id == node_id) / total


def test_greedy_green_shifts_work_to_the_clean_node_and_the_report_adds_up(make_swarm, tmp_path):
    swarm = make_swarm()
    # the hub has its own signal for CLEAN only: DIRTY's intensity comes from the node's report
    signals = write(
        tmp_path / "signals.toml", f'[CLEAN]\nkind = "constant"\nintensity_g_per_kwh = {CLEAN_G}\n'
    )
    swarm.hub_extra = ["--signals", str(signals)]
    swarm.start_hub()
    sponsor = HubClient(swarm.url, Identity.generate(), retry_for_s=30)
    tokens = 2 * 20 * 32 * 8  # two full node-rounds of the tiny run: one agnostic round
    base = {
        "train": {"seq_len": 32, "batch_size": 8, "inner_steps": 20, "min_inner_steps": 2},
        "budget": {"tokens": tokens, "rounds": 100},
    }
    # the control: both nodes do every step of the round whatever their measured speeds (which
    # differ by chance on a loaded machine and would tilt an agnostic split)
    control = {**base, "train": {**base["train"], "min_inner_steps": 20}}
    agnostic = sponsor.create_run(
        tiny_run(**control, round={"deadline_s": 30, "quorum": 2, "min_nodes": 2})
    ).run_id
    clean = swarm.start_node(  # no --run: each node works on the newest active run
        "clean", None, extra=["--energy", str(node_toml(tmp_path / "c.toml", "CLEAN", CLEAN_G))]
    )
    dirty = swarm.start_node(
        "dirty", None, extra=["--energy", str(node_toml(tmp_path / "d.toml", "DIRTY", DIRTY_G))]
    )
    wait_for(lambda: finished(sponsor, agnostic), 90, "the agnostic run to finish")
    greedy = sponsor.create_run(
        tiny_run(
            **base,
            round={"deadline_s": 30, "quorum": 1, "min_nodes": 2},
            energy={"policy": "greedy-green", "deadline_s": 16, "round_overhead_s": 2.0},
        )
    ).run_id
    status = wait_for(lambda: finished(sponsor, greedy), 90, "the greedy-green run to finish")

    # every contribution is metered, placed and accounted
    for c in rows(swarm, m.Contribution):
        assert c.energy_method == "model" and c.energy_wh > 0 and c.power_w > 0
        assert c.region == ("CLEAN" if c.node_id == clean else "DIRTY")
        if c.node_id == clean:
            assert (c.intensity_source, c.intensity_g_per_kwh) == ("hub", CLEAN_G)
        else:
            assert (c.intensity_source, c.intensity_g_per_kwh) == ("node", DIRTY_G)
        assert c.emissions_g == pytest.approx(c.energy_wh * c.intensity_g_per_kwh / 1000)
        assert c.local_surplus_share == 0.0

    # same nodes, same target: agnostic splits the work, greedy-green gives it to the clean node
    split = token_share(rows(swarm, m.Contribution, run_id=agnostic), clean)
    shifted = token_share(rows(swarm, m.Contribution, run_id=greedy), clean)
    assert 0.3 < split < 0.7
    assert shifted > 0.65 and shifted > split + 0.15, (split, shifted)
    assert status["energy"]["policy"] == "greedy-green" and status["energy"]["deadline_met"]
    assert status["energy"]["nodes"][dirty]["intensity_g_per_kwh"] == DIRTY_G

    # the report's totals are the sums of the stored contributions
    for run_id in (agnostic, greedy):
        stored = rows(swarm, m.Contribution, run_id=run_id)
        report = sponsor.run_report(run_id)
        assert report["total"]["tokens"] == sum(c.tokens for c in stored)
        assert report["total"]["energy_kwh"] * 1000 == pytest.approx(
            sum(c.energy_wh for c in stored)
        )
        assert report["total"]["emissions_kg"] * 1000 == pytest.approx(
            sum(c.emissions_g for c in stored)
        )
        per_node = {n["id"]: n for n in report["nodes"]}
        for node_id in {c.node_id for c in stored}:
            mine = [c for c in stored if c.node_id == node_id]
            assert per_node[node_id]["emissions_kg"] * 1000 == pytest.approx(
                sum(c.emissions_g for c in mine)
            )
        assert report["intensity_sources"] == {
            k: v
            for k, v in {
                "hub": sum(c.node_id == clean for c in stored),
                "node": sum(c.node_id == dirty for c in stored),
            }.items()
            if v
        }
    # the agnostic counterfactual of the greedy run is dirtier than what it did
    assert sponsor.run_report(greedy)["reduction_vs_agnostic"] > 0.3

    runner = CliRunner()
    text = runner.invoke(app, ["run", "report", greedy, "--hub", swarm.url])
    assert text.exit_code == 0, text.output
    assert "agnostic counterfactual" in text.output and "clean" in text.output
    as_json = runner.invoke(app, ["run", "report", greedy, "--hub", swarm.url, "--json"])
    assert json.loads(as_json.output)["total"] == sponsor.run_report(greedy)["total"]


FLIP_PERIOD_S, CLEAN_FOR_S = 8, 4  # the trace: clean 4 s, dirty 4 s, looping


def test_node_pauses_and_resumes_as_its_policy_flips_mid_run(make_swarm, tmp_path):
    trace = tmp_path / "flip.csv"
    values = [100] * CLEAN_FOR_S + [900] * (FLIP_PERIOD_S - CLEAN_FOR_S)
    trace.write_text(
        "Time,Carbon Intensity\n"
        + "".join(f"2020-01-01 00:00:{i:02d},{g}\n" for i, g in enumerate(values))
    )
    replay_at = time.time()
    energy = write(
        tmp_path / "flip.toml",
        f"""[energy]
region = "FLIP"
signal = {{ kind = "trace", path = "{trace}", step_s = 1, replay_at = {replay_at} }}
forecast_horizon_s = 16
forecast_step_s = 1
report_every_s = 2
check_every_s = 0.1
[energy.policy]
max_intensity_g_per_kwh = 300
""",
    )
    swarm = make_swarm()
    swarm.start_hub()
    sponsor = HubClient(swarm.url, Identity.generate(), retry_for_s=30)
    run_id = sponsor.create_run(tiny_run(budget={"rounds": 500})).run_id
    node = swarm.start_node("flip", run_id, extra=["--energy", str(energy)])

    def contributions() -> int:
        return sum(n["contributions"] for n in sponsor.run_status(run_id)["nodes"])

    def live_status() -> str | None:
        live = sponsor.run_status(run_id)["live_nodes"]
        return next((n["status"] for n in live if n["id"] == node), None)

    def report_while_paused() -> dict | None:
        """The node's energy report, from the same answer that shows it paused (two answers
        could straddle the trace's next flip on a loaded machine) and once the report says so
        too: the node reports its energy every `report_every_s`, so its status can show the
        pause a report before its energy does."""
        status = sponsor.run_status(run_id)
        live = next((n["status"] for n in status["live_nodes"] if n["id"] == node), None)
        report = status["energy"]["nodes"].get(node)
        return report if live == "paused" and report and not report["available"] else None

    wait_for(contributions, 40, "a first contribution")
    report = wait_for(report_while_paused, 2 * FLIP_PERIOD_S + 5, "the node to pause")
    paused_at = contributions()
    assert report["available"] is False and "intensity 900" in report["reasons"][0]
    wait_for(lambda: live_status() != "paused", FLIP_PERIOD_S + 5, "the node to resume")
    wait_for(lambda: contributions() > paused_at, FLIP_PERIOD_S + 5, "work after the pause")

    # every assignment was taken while the node's grid was clean (1 s slack for the request)
    assignments = rows(swarm, m.Assignment, run_id=run_id)
    phases = [(a.created_at - replay_at) % FLIP_PERIOD_S for a in assignments]
    assert len(phases) >= 2 and max(phases) < CLEAN_FOR_S + 1.0, phases
    # the node's own intensity over each training (the mean of its two ends) is on the trace
    stored = rows(swarm, m.Contribution, run_id=run_id)
    assert all(c.region == "FLIP" and c.intensity_source == "node" for c in stored)
    assert {c.intensity_g_per_kwh for c in stored} <= {100.0, 500.0, 900.0}
    assert min(c.intensity_g_per_kwh for c in stored) == 100.0
