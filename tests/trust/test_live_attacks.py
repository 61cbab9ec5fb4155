"""Cheaters against a real hub process: each attack is rejected, not paid, and on the ledger
with its reason; a 6-node run with 2 cheaters pays the honest nodes exactly what left the escrow.

Nodes are in this process (tests/trust/cheaters.py): real identities, real signed HTTP, real
training; the hub replays their work in its own process.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from gridswarm.identity import Identity, sign_request
from gridswarm.ledger.ops import fund_claim
from gridswarm.node.agent import NodeAgent, NodeOptions
from gridswarm.node.client import HubClient, HubRequestError
from gridswarm.protocol import API
from gridswarm.swarm import Swarm, free_port
from gridswarm.train.params import pack
from tests.conftest import tiny_run, wait_for
from tests.trust.cheaters import (
    CheatingAgent,
    InProcessNode,
    noise,
    other_data_cheat,
    scaled,
    scaling_cheat,
)

pytestmark = pytest.mark.slow
TRAIN = {"seq_len": 32, "batch_size": 8, "inner_steps": 8, "min_inner_steps": 2}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    swarm = Swarm(tmp_path_factory.mktemp("trust-hub"), free_port(), liveness_s=30)
    swarm.start_hub()
    yield swarm
    swarm.stop()


def fund(sponsor: HubClient, run_id: str, units: int) -> dict:
    claim = fund_claim(sponsor.identity, units, run_id=run_id, nonce=str(time.time_ns()))
    body = json.dumps(claim.to_dict()).encode()
    return sponsor.request("POST", f"{API}/runs/{run_id}/fund", body).json()


def new_run(swarm: Swarm, rounds: int = 1, units: int = 3000, **round_cfg) -> tuple:
    sponsor = HubClient(swarm.url, Identity.generate(), retry_for_s=10)
    settings = {"deadline_s": 60, "quorum": 1, "min_nodes": 1} | round_cfg
    cfg = tiny_run(train=TRAIN, round=settings, budget={"rounds": rounds})
    run_id = sponsor.create_run(cfg).run_id
    if units:
        assert fund(sponsor, run_id, units)["escrow_units"] == units
    return sponsor, run_id


def entries(swarm: Swarm, kind: str, run_id: str) -> list[dict]:
    rows = httpx.get(
        f"{swarm.url}{API}/ledger", params={"kind": kind, "limit": 5000}, timeout=10
    ).json()
    return [r["payload"] for r in rows if r["payload"].get("run_id") == run_id]


def finished(sponsor: HubClient, run_id: str) -> dict:
    return wait_for(
        lambda: (s := sponsor.run_status(run_id))["status"] == "finished" and s,
        60,
        "the run to finish",
    )


def balance(swarm: Swarm, node_id: str) -> dict:
    return httpx.get(f"{swarm.url}{API}/nodes/{node_id}/balance", timeout=10).json()


def assert_caught(swarm: Swarm, run_id: str, cheater: str, reason: str) -> None:
    """Rejected with `reason` (alternatives separated by "|") on the ledger, unpaid for that
    round, holding nothing."""
    verdicts = [v for v in entries(swarm, "verdict", run_id) if v["node"] == cheater]
    reasons = reason.split("|")
    refused = [v for v in verdicts if not v["accepted"] and any(r in v["reason"] for r in reasons)]
    assert refused, [v["reason"] for v in verdicts]
    for split in entries(swarm, "reward", run_id):
        if split["round"] in {v["round"] for v in refused}:
            assert cheater not in split["shares"]
    assert balance(swarm, cheater)["available_units"] == 0


def assert_paid(swarm: Swarm, run_id: str, node_id: str) -> None:
    shares = [split["shares"].get(node_id, 0) for split in entries(swarm, "reward", run_id)]
    assert sum(shares) > 0
    assert balance(swarm, node_id)["earned_units"] >= sum(shares)


def test_noise_and_scaled_updates_fail_the_replay_audit(hub: Swarm) -> None:
    sponsor, run_id = new_run(hub)
    honest, noisy, scaler = (InProcessNode(hub.url) for _ in range(3))
    jobs = [(n, n.assignment(run_id)) for n in (honest, noisy, scaler)]
    for node, a in jobs:
        tamper = {noisy: noise, scaler: scaled(3.0)}.get(node)
        assert node.submit(run_id, node.build(a, tamper=tamper)).accepted  # looks fine at first
    status = finished(sponsor, run_id)
    assert_caught(hub, run_id, noisy.node_id, "audit failed")
    assert_caught(hub, run_id, scaler.node_id, "does not reproduce the update bit for bit")
    assert_paid(hub, run_id, honest.node_id)
    trust = status["trust"]
    assert trust["rejected"] == 2 and trust["audits_failed"] == 2 and trust["audited"] == 3
    assert trust["nodes"][noisy.node_id]["strikes"] == 1
    # excluded from aggregation: only the honest tokens made it into the model
    assert status["tokens_total"] == 8 * 32 * 8
    # the revealed seed matches the commitment made when the round opened
    opened, closed = entries(hub, "round", run_id)
    assert opened["event"] == "open" and closed["event"] == "close"
    assert opened["audit_commitment"] == closed["audit_commitment"]
    seed = bytes.fromhex(closed["audit_seed"])
    assert hashlib.sha256(seed).hexdigest() == opened["audit_commitment"]
    # a caught cheater gets no more work anywhere
    _, other_run = new_run(hub, units=0)
    with pytest.raises(HubRequestError, match="excluded"):
        noisy.client.assignment(other_run, wait_s=0)


def test_copy_of_another_nodes_contribution_is_caught(hub: Swarm) -> None:
    sponsor, run_id = new_run(hub)
    honest, copier = InProcessNode(hub.url), InProcessNode(hub.url)
    a_honest, a_copier = honest.assignment(run_id), copier.assignment(run_id)
    original = honest.build(a_honest)
    copy = copier.build(a_copier, result=original.result, tensors=original.tensors)
    assert copier.submit(run_id, copy).accepted  # the copy even arrives first
    assert honest.submit(run_id, original).accepted
    finished(sponsor, run_id)
    assert_caught(hub, run_id, copier.node_id, "audit failed|(a copy)")
    assert_paid(hub, run_id, honest.node_id)


def test_replay_of_an_old_contribution_is_refused_and_forfeits(hub: Swarm) -> None:
    sponsor, run_id = new_run(hub, rounds=2, units=4000)
    honest, replayer = InProcessNode(hub.url), InProcessNode(hub.url)
    first = {}
    for node in (honest, replayer):
        first[node.node_id] = (node, node.assignment(run_id))
    old = {}
    for node, a in first.values():
        old[node.node_id] = node.build(a)
        assert node.submit(run_id, old[node.node_id]).accepted
    wait_for(lambda: sponsor.run_status(run_id)["version"] == 1, 30, "round 0 to close")
    earned_in_round_0 = balance(hub, replayer.node_id)["earned_units"]
    assert earned_in_round_0 > 0  # honest work in round 0 was paid
    a_honest, a_replayer = honest.assignment(run_id), replayer.assignment(run_id)
    again = replayer.build(
        a_replayer, result=old[replayer.node_id].result, tensors=old[replayer.node_id].tensors
    )
    with pytest.raises(HubRequestError, match="replay") as refused:
        replayer.submit(run_id, again)
    assert refused.value.status == 409
    replayer.client.leave()  # gives its assignment back so the round need not wait for it
    assert honest.submit(run_id, honest.build(a_honest)).accepted
    finished(sponsor, run_id)
    assert_caught(hub, run_id, replayer.node_id, "replay: the same update")
    slashes = [s for s in entries(hub, "slash", run_id) if s["account"] == replayer.node_id]
    assert [s["amount_units"] for s in slashes] == [earned_in_round_0]  # what it held, forfeit
    assert_paid(hub, run_id, honest.node_id)


def test_claiming_more_tokens_than_processed(hub: Swarm) -> None:
    sponsor, run_id = new_run(hub)
    honest, inflator, shirker = (InProcessNode(hub.url) for _ in range(3))
    a_h, a_i, a_s = (n.assignment(run_id) for n in (honest, inflator, shirker))
    with pytest.raises(HubRequestError, match="tokens") as refused:
        inflator.submit(run_id, inflator.build(a_i, tokens=10 * a_i.inner_steps * 256))
    assert refused.value.status == 400
    inflator.client.leave()
    # claims the assigned steps (and their tokens) but trained only 2 of them
    lazy = shirker.train(a_s, steps=2)
    assert shirker.submit(run_id, shirker.build(a_s, result=lazy)).accepted
    assert honest.submit(run_id, honest.build(a_h)).accepted
    finished(sponsor, run_id)
    assert_caught(hub, run_id, inflator.node_id, "false claim: tokens")
    assert_caught(hub, run_id, shirker.node_id, "audit failed")
    assert_paid(hub, run_id, honest.node_id)


def test_training_on_other_data_than_assigned(hub: Swarm) -> None:
    sponsor, run_id = new_run(hub)
    honest, stray = InProcessNode(hub.url), InProcessNode(hub.url)
    a_h, a_s = honest.assignment(run_id), stray.assignment(run_id)
    elsewhere = stray.train(a_s, node_id=honest.node_id + "x")  # a slice not assigned to it
    assert stray.submit(run_id, stray.build(a_s, result=elsewhere)).accepted
    assert honest.submit(run_id, honest.build(a_h)).accepted
    finished(sponsor, run_id)
    assert_caught(hub, run_id, stray.node_id, "audit failed")
    assert_paid(hub, run_id, honest.node_id)


def test_energy_under_reported_against_the_meter_model(hub: Swarm) -> None:
    sponsor, run_id = new_run(hub)
    honest, liar = InProcessNode(hub.url), InProcessNode(hub.url)
    a_h, a_l = honest.assignment(run_id), liar.assignment(run_id)
    work = honest.train(a_h)
    # honest: what the meter model says at full load (unknown CPU: 10 W per core), half busy
    honest_wh = 0.5 * 10.0 * work.train_time_s / 3600
    assert honest.submit(run_id, honest.build(a_h, result=work, energy_wh=honest_wh)).accepted
    with pytest.raises(HubRequestError, match="energy under-reported") as refused:
        liar.submit(run_id, liar.build(a_l, energy_wh=honest_wh / 1000))
    assert refused.value.status == 400 and "meter model" in refused.value.detail
    liar.client.leave()
    finished(sponsor, run_id)
    assert_caught(hub, run_id, liar.node_id, "energy under-reported")
    assert_paid(hub, run_id, honest.node_id)


def test_signing_as_another_node(hub: Swarm) -> None:
    sponsor, run_id = new_run(hub)
    victim, sybil, forger = (InProcessNode(hub.url) for _ in range(3))
    a_v, a_s, a_f = (n.assignment(run_id) for n in (victim, sybil, forger))
    # a claim signed with a key other than the uploader's own
    with pytest.raises(HubRequestError, match="claim signed as another node") as refused:
        sybil.submit(run_id, sybil.build(a_s, signer=Identity.generate()))
    assert refused.value.status == 403
    # a claim in the victim's name: its key as author, a signature the forger made
    upload = forger.build(a_f)
    forged = dict(upload.meta["claim"], author=victim.identity.public_key.hex())
    with pytest.raises(HubRequestError, match="claim signed as another node"):
        forger.client.contribute(run_id, pack(upload.tensors, dict(upload.meta, claim=forged)))
    # the whole request in the victim's name: refused before anything is read, nobody blamed
    path = f"{API}/runs/{run_id}/contributions"
    headers = sign_request(forger.identity, "POST", path, upload.body)
    headers["x-gridswarm-key"] = victim.identity.public_key.hex()
    r = httpx.post(hub.url + path, content=upload.body, headers=headers, timeout=10)
    assert r.status_code == 401 and "bad signature" in r.json()["detail"]
    for node in (sybil, forger):
        node.client.leave()
    assert victim.submit(run_id, victim.build(a_v)).accepted
    finished(sponsor, run_id)
    assert_caught(hub, run_id, sybil.node_id, "claim signed as another node")
    assert_caught(hub, run_id, forger.node_id, "claim signed as another node")
    assert_paid(hub, run_id, victim.node_id)
    assert all(
        v["accepted"] for v in entries(hub, "verdict", run_id) if v["node"] == victim.node_id
    )


def test_six_nodes_two_cheat_honest_paid_sums_exact(hub: Swarm, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    agents: list[NodeAgent] = []
    for i in range(6):
        options = NodeOptions(hub_url=hub.url, home=tmp_path / f"n{i}", max_threads=1, wait_s=2)
        if i < 4:
            agents.append(NodeAgent(options))
            continue
        agent = CheatingAgent(options)
        agent.cheat = scaling_cheat if i == 4 else other_data_cheat
        agents.append(agent)
    errors: dict[str, Exception] = {}

    def work(agent: NodeAgent) -> None:
        try:
            agent.run()
        except HubRequestError as exc:  # a caught cheater is turned away (403)
            errors[agent.node_id] = exc

    sponsor, run_id = new_run(hub, rounds=3, units=10_000, quorum=4)
    for agent in agents:
        agent.options.run_id = run_id
    threads = [threading.Thread(target=work, args=(a,), daemon=True) for a in agents]
    for t in threads:
        t.start()
    status = wait_for(
        lambda: (s := sponsor.run_status(run_id))["status"] == "finished" and s,
        90,
        "the 6-node run to finish",
    )
    for agent in agents:
        agent.stop_event.set()
    for t in threads:
        t.join(timeout=30)
    honest, cheaters = agents[:4], agents[4:]
    trust = status["trust"]
    for agent in cheaters:
        assert trust["nodes"][agent.node_id]["rejected"] >= 1
        assert_caught(hub, run_id, agent.node_id, "audit failed")
    for agent in honest:
        if agent.node_id in trust["nodes"]:  # contributed at least once
            assert trust["nodes"][agent.node_id]["rejected"] == 0
    paid = {a.node_id for a in honest if balance(hub, a.node_id)["earned_units"] > 0}
    assert len(paid) >= 3
    splits = entries(hub, "reward", run_id)
    shares = sum(sum(s["shares"].values()) for s in splits)
    assert all(sum(s["shares"].values()) + s["carried_units"] == s["pool_units"] for s in splits)
    earned = sum(balance(hub, a.node_id)["earned_units"] for a in agents)
    assert earned == shares == trust["rewarded_units"]
    assert trust["funded_units"] - trust["rewarded_units"] == trust["escrow_units"]
    assert status["val_loss"][-1] < status["val_loss"][0]
    assert httpx.get(f"{hub.url}{API}/ledger/verify", timeout=30).json()["ok"]
    assert set(errors) <= {a.node_id for a in cheaters}


def test_claims_are_on_the_ledger_as_the_node_signed_them(hub: Swarm) -> None:
    sponsor, run_id = new_run(hub, units=0)
    node = InProcessNode(hub.url)
    a = node.assignment(run_id)
    upload = node.build(a)
    assert node.submit(run_id, upload).accepted
    finished(sponsor, run_id)
    rows = httpx.get(
        f"{hub.url}{API}/ledger", params={"kind": "contribution", "limit": 5000}, timeout=10
    ).json()
    mine = [r for r in rows if r["payload"]["assignment_id"] == a.id]
    assert len(mine) == 1 and mine[0]["scope"] == "claim"
    assert mine[0]["author"] == node.identity.public_key.hex()
    assert mine[0]["signature"] == upload.meta["claim"]["signature"]
    (split,) = entries(hub, "reward", run_id)
    assert split["pool_units"] == 0 and "not funded" in split["note"]
