"""Secure aggregation (SecAgg+) in live rounds on a real hub: three node processes and one
in-process node (real identity, real HTTP) that can be stopped between stages."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from gridswarm.config import RunConfig
from gridswarm.hub import models as m
from gridswarm.hub.server import make_engine
from gridswarm.identity import Identity
from gridswarm.node.client import HubClient
from gridswarm.node.secagg import SecAggContributor
from gridswarm.privacy.dp import clip_updates
from gridswarm.privacy.secagg import decode_message
from gridswarm.protocol import Assignment, ContributionMeta, RegisterRequest
from gridswarm.train.params import unpack_vector
from gridswarm.train.workload import Workload
from tests.conftest import tiny_run, wait_for

pytestmark = pytest.mark.slow


class InProcessNode:
    """A node driven step by step by the test: it heartbeats while `alive` is set."""

    def __init__(self, url: str, name: str) -> None:
        self.identity = Identity.generate()
        self.client = HubClient(url, self.identity, retry_for_s=10)
        self.client.register(RegisterRequest(probe_tokens_per_s=1e5, probe_numel=1000, name=name))
        self._beats = HubClient(url, self.identity, retry_for_s=2)
        self.alive = threading.Event()
        self.alive.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def _heartbeat(self) -> None:
        while not self._stop.wait(0.5):
            if self.alive.is_set():
                with contextlib.suppress(Exception):
                    self._beats.heartbeat("training")

    def assignment(self, run_id: str) -> Assignment:
        def get():
            answer = self.client.assignment(run_id, wait_s=2)
            return answer.assignment if answer.status == "assigned" else None

        return wait_for(get, 60, f"an assignment for {self.node_id}", poll_s=0.05)

    def train(self, a: Assignment) -> tuple[torch.Tensor, ContributionMeta]:
        """Real local training, as the node process would do it."""
        workload = Workload.from_config(RunConfig.model_validate(a.config))
        theta = unpack_vector(self.client.blob(a.weights_blob))
        result = workload.train(theta, a.round, self.node_id, a.inner_steps, a.attempt)
        meta = ContributionMeta(
            assignment_id=a.id,
            codec="secagg-u32",
            steps=result.steps,
            tokens=result.tokens,
            loss_first=result.loss_first,
            loss_last=result.loss_last,
            loss_mean=result.loss_mean,
            train_time_s=result.train_time_s,
            threads=1,
        )
        return result.pseudo_gradient, meta

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def follow_until(contributor: SecAggContributor, last_stage: str, timeout_s: float) -> None:
    """Answer the hub's SecAgg tasks until `last_stage` has been sent, then stop (vanish)."""
    deadline = time.monotonic() + timeout_s
    while last_stage not in contributor.stages and time.monotonic() < deadline:
        task = contributor.poll(wait_s=1.0)
        assert task["stage"] not in ("done", "aborted"), task
        if task["stage"] != "wait":
            contributor.answer(task)
    assert last_stage in contributor.stages


def rows(engine, table, *where):
    with Session(engine) as s:
        return s.scalars(select(table).where(*where)).all()


def test_secagg_rounds_recover_the_mean_even_when_a_node_vanishes_after_masking(make_swarm):
    swarm = make_swarm(liveness_s=3.0)
    swarm.start_hub()
    sponsor = HubClient(swarm.url, Identity.generate(), retry_for_s=30)
    config = tiny_run(
        round={"deadline_s": 60, "quorum": 4, "min_nodes": 4},
        # k = 2: a sparse ring (SecAgg+), threshold 2 of {owner, 2 neighbours}; t = 1
        privacy={"secagg": {"neighbours": 2, "max_dropouts": 1, "stage_timeout_s": 20}},
        budget={"rounds": 2},
    )
    run_id = sponsor.create_run(config).run_id
    victim = InProcessNode(swarm.url, "victim")
    try:
        for i in range(3):
            swarm.start_node(f"n{i}", run_id)
        # Round 0: the victim trains, shares keys, uploads its masked input, then vanishes.
        a0 = victim.assignment(run_id)
        update0, meta0 = victim.train(a0)
        contributor = SecAggContributor(
            victim.client, a0, victim.node_id, update0, meta0, update0.numel()
        )
        contributor.advertise()
        follow_until(contributor, "masked", 60)
        victim.alive.clear()
        wait_for(
            lambda: sponsor.run_status(run_id)["rounds"][0]["status"] == "closed",
            60,
            "round 0 to close without the victim's unmask shares",
        )
        # The victim comes back (same key) and takes part in round 1 from start to end.
        victim.alive.set()
        a1 = victim.assignment(run_id)
        update1, meta1 = victim.train(a1)
        outcome = SecAggContributor(
            victim.client, a1, victim.node_id, update1, meta1, update1.numel()
        ).run(threading.Event(), 60)
        assert outcome.status == "done", outcome.reason
        status = wait_for(
            lambda: (s := sponsor.run_status(run_id))["status"] == "finished" and s,
            60,
            "the SecAgg run to finish",
        )
    finally:
        victim.close()

    assert status["version"] == 2
    assert status["val_loss"][-1] < status["val_loss"][0] - 0.3
    secagg_rounds = status["privacy"]["secagg_rounds"]
    assert [(r["survivors"], r["dropped"], r["failures"]) for r in secagg_rounds] == [
        (4, 0, 0),
        (4, 0, 0),
    ]
    assert status["privacy"]["per_node_audits"] is False

    engine = make_engine(swarm.db_url)
    cfg = RunConfig.model_validate(status["config"])
    blobs = swarm.workdir / "blobs"
    read = lambda digest: next(blobs.rglob(digest)).read_bytes()  # noqa: E731
    versions = {v.number: v for v in rows(engine, m.Version)}
    own = {(victim.node_id, 0): update0, (victim.node_id, 1): update1}
    workload = Workload.from_config(cfg)
    for rnd in (0, 1):
        # The victim never answered round 0's unmask stage, yet its input is in the sum.
        unmasked_by = {
            x.node_id
            for x in rows(
                engine,
                m.SecAggMessage,
                m.SecAggMessage.round == rnd,
                m.SecAggMessage.stage == "unmask",
            )
        }
        assert (victim.node_id in unmasked_by) == (rnd == 1)
        # The recovered aggregate is the token-weighted mean of the same updates, replayed.
        theta = unpack_vector(read(versions[rnd].weights_blob))
        updates, weights = [], []
        for c in rows(engine, m.Contribution, m.Contribution.round == rnd):
            assert c.status == "accepted" and c.codec == "secagg-u32"
            a = rows(engine, m.Assignment, m.Assignment.id == c.assignment_id)[0]
            x = own.get((c.node_id, rnd))
            if x is None:
                x = workload.train(theta, rnd, c.node_id, a.inner_steps).pseudo_gradient
            updates.append(x)
            weights.append(float(c.tokens))
        w = torch.tensor(weights)
        expected = (w[:, None] * torch.stack(updates)).sum(0) / w.sum()
        session = rows(engine, m.SecAggSession, m.SecAggSession.round == rnd)[0]
        aggregate = unpack_vector(read(session.aggregate_blob))
        assert float((aggregate - expected).abs().max()) < 1e-6
        assert float(expected.abs().max()) > 1e-3

        # The hub holds masked words only: uniform-looking and unrelated to any single update.
        masked = rows(
            engine, m.SecAggMessage, m.SecAggMessage.round == rnd, m.SecAggMessage.stage == "masked"
        )
        assert len(masked) == 4
        config = decode_message(session.config_json.encode())
        for msg in masked:
            words = np.frombuffer(read(msg.body), dtype="<u4").astype(np.float64) / 2**32
            assert abs(words.mean() - 0.5) < 0.01 and abs(words.std() - 12**-0.5) < 0.01
            as_update = torch.from_numpy(words.astype(np.float32))
            for x in updates:
                corr = torch.corrcoef(torch.stack([as_update, x]))[0, 1]
                assert abs(float(corr)) < 0.05
        assert config.degree == 2 and len(config.node_ids) == 4

    # No blob in the store is a plain contribution: versions, the SecAgg sums/aggregates and
    # masked inputs only.
    known = {
        b
        for v in versions.values()
        for b in (v.weights_blob, v.delta_blob, v.momentum_blob, v.error_feedback_blob)
        if b
    }
    known |= {x for s_ in rows(engine, m.SecAggSession) for x in (s_.sum_blob, s_.aggregate_blob)}
    known |= {x.body for x in rows(engine, m.SecAggMessage, m.SecAggMessage.stage == "masked")}
    stored = {p.name for p in blobs.rglob("*") if p.is_file()}
    assert stored <= known
    assert not any(
        (blobs.rglob(c.id)) and list(blobs.rglob(c.id)) for c in rows(engine, m.Contribution)
    )


def fake_training(
    node: InProcessNode, a: Assignment, seed: int
) -> tuple[torch.Tensor, ContributionMeta]:
    """An update without training (the hub cannot tell): enough to exercise the stages."""
    cfg = RunConfig.model_validate(a.config)
    numel = Workload.from_config(cfg).numel
    update = 0.02 * torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    meta = ContributionMeta(
        assignment_id=a.id,
        codec="secagg-u32",
        steps=a.inner_steps,
        tokens=a.inner_steps * cfg.tokens_per_step,
        loss_first=5.0,
        loss_last=4.0,
        loss_mean=4.5,
        train_time_s=0.1,
        threads=1,
    )
    return update, meta


def test_more_than_t_dropouts_replan_the_round_then_distributed_dp_completes(make_swarm):
    swarm = make_swarm(liveness_s=2.0)
    swarm.start_hub()
    sponsor = HubClient(swarm.url, Identity.generate(), retry_for_s=30)
    dp = {"noise": "distributed", "clip_norm": 0.5, "noise_multiplier": 0.5, "epsilon_budget": 50}
    config = tiny_run(
        round={"deadline_s": 30, "quorum": 3, "min_nodes": 3},
        privacy={"secagg": {"neighbours": 2, "max_dropouts": 1, "stage_timeout_s": 20}, "dp": dp},
        budget={"rounds": 1},
    )
    run_id = sponsor.create_run(config).run_id
    nodes = [InProcessNode(swarm.url, f"p{i}") for i in range(3)]
    try:
        # Attempt 0: everyone shares keys, then two of the three vanish (t = 1).
        first = []
        for i, node in enumerate(nodes):
            a = node.assignment(run_id)
            update, meta = fake_training(node, a, seed=i)
            c = SecAggContributor(node.client, a, node.node_id, update, meta, update.numel())
            c.advertise()
            first.append(c)
        for c in first:
            follow_until(c, "share", 30)
        nodes[1].alive.clear()
        nodes[2].alive.clear()
        follow_until(first[0], "masked", 30)

        def aborted():
            task = first[0].poll(wait_s=1.0)
            return task if task["stage"] == "aborted" else None

        task = wait_for(aborted, 30, "the SecAgg round to fail")
        assert "mask stage" in task["reason"] and "max_dropouts = 1" in task["reason"]

        # Attempt 1: all three come back, train again with fresh keys; the round completes.
        for node in nodes:
            node.alive.set()
        updates, outcomes, threads = {}, {}, []
        for i, node in enumerate(nodes):
            a = node.assignment(run_id)
            assert a.attempt == 1
            updates[node.node_id], meta = fake_training(node, a, seed=10 + i)
            c = SecAggContributor(
                node.client,
                a,
                node.node_id,
                updates[node.node_id],
                meta,
                updates[node.node_id].numel(),
            )
            t = threading.Thread(
                target=lambda c=c, n=node.node_id: outcomes.__setitem__(
                    n, c.run(threading.Event(), 60)
                )
            )
            t.start()
            threads.append(t)
        for t in threads:
            t.join(timeout=90)
        assert {n: o.status for n, o in outcomes.items()} == {n.node_id: "done" for n in nodes}
        status = wait_for(
            lambda: (s := sponsor.run_status(run_id))["status"] == "finished" and s,
            30,
            "the run to finish",
        )
    finally:
        for node in nodes:
            node.close()

    assert status["rounds"][0]["attempts"] == 2
    p = status["privacy"]
    assert p["dp"] == "distributed" and p["secagg"] is True
    (session,) = p["secagg_rounds"]
    assert session["failures"] == 1 and "max_dropouts" in session["last_failure"]
    assert (session["survivors"], session["dropped"]) == (3, 0)
    assert len(p["epsilon_per_round"]) == 1 and 0 < p["epsilon"] <= 50
    engine = make_engine(swarm.db_url)
    statuses = sorted(c.status for c in rows(engine, m.Contribution))
    assert statuses == ["accepted"] * 3 + ["discarded"] * 3
    # The aggregate is the mean of the clipped updates plus the nodes' noise shares: each adds
    # N(0, (zC)^2 / (n - t)), so the mean carries std zC sqrt(n / (n - t)) / n.
    with Session(engine) as s:
        agg_blob = s.scalars(select(m.SecAggSession.aggregate_blob)).one()
    aggregate = unpack_vector(next((swarm.workdir / "blobs").rglob(agg_blob)).read_bytes())
    clipped, _ = clip_updates(torch.stack(list(updates.values())), 0.5)
    noise = aggregate - clipped.mean(0)
    expected_std = 0.5 * 0.5 * (3 / 2) ** 0.5 / 3
    assert abs(float(noise.std()) / expected_std - 1) < 0.1
