"""Real swarms on loopback: a hub process and node processes, killed and restarted for real."""

from __future__ import annotations

import re
import signal

import pytest
import torch
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from gridswarm.config import RunConfig
from gridswarm.export import export_run, sample_text
from gridswarm.hub import models as m
from gridswarm.hub.server import make_engine
from gridswarm.identity import Identity
from gridswarm.node.client import HubClient
from gridswarm.swarm import Swarm
from gridswarm.train.codecs import make_codec
from gridswarm.train.params import unpack, unpack_vector
from gridswarm.train.workload import Workload
from tests.conftest import tiny_run, wait_for

pytestmark = pytest.mark.slow


def start(swarm: Swarm, config: dict) -> tuple[HubClient, str]:
    swarm.start_hub()
    sponsor = HubClient(swarm.url, Identity.generate(), retry_for_s=30)
    return sponsor, sponsor.create_run(config).run_id


def finished(sponsor: HubClient, run_id: str):
    status = sponsor.run_status(run_id)
    return status if status["status"] == "finished" else None


def node_status(sponsor: HubClient, run_id: str, node_id: str) -> str | None:
    live = sponsor.run_status(run_id)["live_nodes"]
    return next((n["status"] for n in live if n["id"] == node_id), None)


def rows(swarm: Swarm, table):
    engine = make_engine(swarm.db_url)
    with Session(engine) as s:
        return s.scalars(select(table)).all()


def test_full_run_trains_and_replays_bit_for_bit(make_swarm):
    swarm = make_swarm()
    sponsor, run_id = start(swarm, tiny_run(round={"deadline_s": 30, "quorum": 2, "min_nodes": 2}))
    for i in range(2):
        swarm.start_node(f"n{i}", run_id)
    status = wait_for(lambda: finished(sponsor, run_id), 90, "the run to finish")
    assert status["version"] == 3
    assert status["val_loss"][-1] < status["val_loss"][0] - 0.8
    assert len(status["nodes"]) == 2 and all(n["contributions"] == 3 for n in status["nodes"])
    assert status["bytes_sync_dp_equivalent"] > 10 * status["bytes_up_total"]
    model_dir = export_run(sponsor, status, swarm.workdir / "model")
    text = sample_text(model_dir, "ROMEO:", 40, 0.8, seed=0)
    assert text.startswith("ROMEO:") and len(text.encode()) >= 40

    # Replay one stored contribution from its version and slice: the same bits come out.
    cfg = RunConfig.model_validate(status["config"])
    contribution = next(c for c in rows(swarm, m.Contribution) if c.round == 1)
    assignment = next(a for a in rows(swarm, m.Assignment) if a.id == contribution.assignment_id)
    version = next(v for v in rows(swarm, m.Version) if v.number == contribution.base_version)
    blobs = swarm.workdir / "blobs"
    stored, _ = unpack(next(blobs.rglob(contribution.id)).read_bytes())
    theta = unpack_vector(next(blobs.rglob(version.weights_blob)).read_bytes())
    replay = Workload.from_config(cfg).train(
        theta, assignment.round, contribution.node_id, assignment.inner_steps, assignment.attempt
    )
    again = make_codec(cfg.comm.codec, cfg.comm.block_size).encode(replay.pseudo_gradient)
    assert stored.keys() == again.keys()
    assert all(torch.equal(stored[k], again[k]) for k in stored)


def test_node_killed_mid_round_does_not_stall_the_run(make_swarm):
    swarm = make_swarm(liveness_s=3.0)
    sponsor, run_id = start(
        swarm,
        tiny_run(
            # long assignments for the throttled victim: it is killed in the middle of one
            train={"seq_len": 32, "batch_size": 8, "inner_steps": 60, "min_inner_steps": 40},
            round={"deadline_s": 60, "quorum": 1, "min_nodes": 1},
            budget={"rounds": 3},
        ),
    )
    steady = swarm.start_node("steady", run_id)
    victim = swarm.start_node("victim", run_id, throttle=0.9)
    wait_for(
        lambda: node_status(sponsor, run_id, victim) == "training", 60, "the victim to be training"
    )
    swarm.kill_node(victim)
    status = wait_for(lambda: finished(sponsor, run_id), 60, "the run to finish without the victim")
    # the one it was training when killed is its last (on a loaded machine it may have finished
    # an earlier one before the status poll saw it training)
    victim_rows = sorted(
        (a for a in rows(swarm, m.Assignment) if a.node_id == victim),
        key=lambda a: (a.round, a.attempt),
    )
    killed_round = victim_rows[-1]
    assert killed_round.status == "missed"
    assert all(a.status == "submitted" for a in victim_rows[:-1])
    first = status["rounds"][killed_round.round]
    assert first["close_reason"] == "all-in"  # closed once the victim was declared lost
    assert first["closed_at"] - first["opened_at"] < 30
    contributed = {n["id"] for n in status["nodes"] if n["contributions"]}
    assert contributed == ({steady, victim} if len(victim_rows) > 1 else {steady})
    states = {n["id"]: n["state"] for n in status["nodes"]}
    assert states[victim] == "silent"  # killed: not heard from, never said it left


def test_hub_killed_mid_round_loses_nothing_accepted(make_swarm):
    swarm = make_swarm()
    sponsor, run_id = start(
        swarm, tiny_run(round={"deadline_s": 60, "quorum": 2, "min_nodes": 2}, budget={"rounds": 4})
    )
    swarm.start_node("fast", run_id)
    swarm.start_node("slow", run_id, throttle=0.85)

    def half_done_round():
        for r in sponsor.run_status(run_id)["rounds"]:
            if r["number"] >= 1 and r["status"] == "open" and r["assignments"].get("submitted"):
                return r["number"]
        return None

    round_at_kill = wait_for(half_done_round, 90, "a round with one contribution in", poll_s=0.05)
    swarm.kill_hub()
    accepted = {c.id for c in rows(swarm, m.Contribution)}
    assert accepted
    swarm.start_hub()
    status = wait_for(lambda: finished(sponsor, run_id), 120, "the run to finish after restart")
    after = {c.id: c for c in rows(swarm, m.Contribution)}
    assert accepted <= after.keys()  # nothing acknowledged was lost
    closed = {r["number"]: r for r in status["rounds"]}
    assert closed[round_at_kill]["status"] == "closed"
    assert status["version"] == 4 and status["val_loss"][-1] < status["val_loss"][0]


@pytest.mark.postgres
def test_full_run_on_postgresql(make_swarm, postgres_url):
    swarm = make_swarm(db_url=postgres_url)
    sponsor, run_id = start(swarm, tiny_run(budget={"rounds": 2}))
    swarm.start_node("pg-node", run_id)
    status = wait_for(lambda: finished(sponsor, run_id), 90, "the run to finish on PostgreSQL")
    assert status["version"] == 2
    engine = create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    assert engine.dialect.name == "postgresql"
    with Session(engine) as s:
        assert len(s.scalars(select(m.Contribution)).all()) == 2


def test_sigterm_leaves_cleanly_and_the_same_key_is_the_same_node(make_swarm):
    swarm = make_swarm()
    sponsor, run_id = start(
        swarm,
        tiny_run(
            train={"seq_len": 32, "batch_size": 8, "inner_steps": 200, "min_inner_steps": 2},
            round={"deadline_s": 120, "quorum": 1},
            budget={"rounds": 2},
        ),
    )
    node_id = swarm.start_node("polite", run_id, throttle=0.9)
    wait_for(
        lambda: node_status(sponsor, run_id, node_id) == "training", 60, "the node to be training"
    )
    swarm.nodes[node_id].send_signal(signal.SIGTERM)
    assert swarm.nodes[node_id].wait(timeout=30) == 0
    assert [a.status for a in rows(swarm, m.Assignment)] == ["released"]
    assert swarm.start_node("polite", run_id) == node_id  # same home, same key, same node
    wait_for(lambda: finished(sponsor, run_id), 60, "the restarted node to finish the run")
    assert [n.id for n in rows(swarm, m.Node)] == [node_id]
    log = (swarm.workdir / "polite.log").read_text()  # each assignment: round, H, tokens, s, bytes
    assert re.search(r"round \d+: H=\d+, \d+ tokens, [\d.]+ s, \d+ bytes up, loss [\d.]+", log)
