"""The round engine's store (hub/store/rounds.py) on the real hub's database: the snapshot it reads
is the round's rows, each effect becomes the row change it names, and a tick's effects (lost
nodes included) are committed in the transaction that decided them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from gridswarm.hub import models as m
from gridswarm.hub.engine import (
    AdvanceStage,
    Assign,
    ContributionRow,
    FailSecAgg,
    FinishRun,
    FinishSecAgg,
    FinishSource,
    IllegalEvent,
    MarkLate,
    MarkMissed,
    MarkSubmitted,
    MissOutstanding,
    OpenRound,
    OpenSecAgg,
    RecordContribution,
    ReleaseOutstanding,
    Replan,
)
from gridswarm.hub.errors import HubError
from gridswarm.hub.lifecycle import RunState
from gridswarm.hub.rounds import Decision
from gridswarm.hub.states import AssignmentStatus, ContributionStatus, RoundStatus
from gridswarm.hub.store.rounds import apply_effects, read_snapshot, row_snapshot
from gridswarm.identity import Identity
from gridswarm.protocol import ContributionMeta, Refusal, RegisterRequest
from gridswarm.train.codecs import make_codec
from gridswarm.train.params import pack
from gridswarm.trust.claims import CLAIM_KIND, sign_contribution, update_sha256
from tests.harness import FakeClock, new_service

RUN = {
    "name": "round-store",
    "seed": 5,
    "model": {"n_layer": 1, "n_head": 1, "n_embd": 8},
    "train": {"seq_len": 8, "batch_size": 2, "inner_steps": 4, "min_inner_steps": 1},
    "round": {"deadline_s": 60, "quorum": 2, "min_nodes": 2, "max_nodes": 3},
    "budget": {"rounds": 9, "tokens": 10**6},
    "trust": {"audit_max_rate": 0, "audit_min_rate": 0, "usefulness": False},
}


@pytest.fixture
def hub(tmp_path: Path):
    """A hub with one run whose round 0 is open with three assigned nodes."""
    torch.set_num_threads(1)
    clock = FakeClock()
    service = new_service(tmp_path, clock)
    run_id = service.create_run(Identity.generate().public_key, RUN).run_id
    numel = service.run_status(run_id)["numel"]
    nodes = []
    for i in range(3):
        ident = Identity.from_seed(hashlib.sha256(f"store node {i}".encode()).digest())
        req = RegisterRequest(probe_tokens_per_s=1000.0, probe_numel=numel)
        nodes.append(service.membership.register(ident.public_key, req))
    for node_id in nodes:
        assert service.asks.request_assignment(run_id, node_id).status == "assigned"
    return service, clock, run_id, nodes


def assignment_statuses(service, run_id: str) -> dict[str, AssignmentStatus]:
    with service.sessions() as s:
        rows = s.execute(
            select(m.Assignment.node_id, m.Assignment.status).where(m.Assignment.run_id == run_id)
        ).all()
    return dict(rows)


def claims(assignment_id: str, codec: str) -> ContributionMeta:
    """A node's claims for 4 steps of 16 tokens on `assignment_id` (what a row records)."""
    return ContributionMeta(
        assignment_id=assignment_id,
        codec=codec,
        steps=4,
        tokens=64,
        loss_first=3.0,
        loss_last=2.5,
        loss_mean=2.7,
        train_time_s=0.5,
        threads=1,
    )


def test_the_snapshot_is_the_rounds_rows(hub):
    service, _clock, run_id, nodes = hub
    with service.sessions() as s:
        run = s.get(m.Run, run_id)
        rnd, snap = read_snapshot(s, run, heard_since=service.started_at)
    assert (rnd.number, snap.number, snap.base_version, snap.attempt) == (0, 0, 0, 0)
    assert snap.status is RoundStatus.OPEN and snap.deadline_at == rnd.deadline_at
    assert sorted(a.node_id for a in snap.assignments) == sorted(nodes)
    assert {a.status for a in snap.assignments} == {AssignmentStatus.ASSIGNED}
    assert snap.accepted == 0
    assert (snap.run.status, snap.run.version, snap.run.tokens_total) == (RunState.ACTIVE, 0, 0)
    assert (snap.run.rounds_budget, snap.run.tokens_budget) == (9, 10**6)


def test_a_lost_node_is_missed_in_the_ticks_own_commit(hub):
    service, clock, run_id, nodes = hub
    clock.advance(25.0)  # past liveness_s (20 s): the third node never sent a heartbeat
    for node_id in nodes[:2]:
        service.membership.heartbeat(node_id, "training")
    service.ticker.tick()  # flushes the heartbeats, then ticks the engine
    statuses = assignment_statuses(service, run_id)
    assert statuses[nodes[2]] is AssignmentStatus.MISSED
    assert [statuses[n] for n in nodes[:2]] == [AssignmentStatus.ASSIGNED] * 2
    # nothing else happened to the round: it waits for the other two
    assert service.ticker.advance_run(run_id) is Decision.WAIT
    assert service.run_status(run_id)["version"] == 0


def test_each_effect_is_the_row_change_it_names(hub):
    service, clock, run_id, nodes = hub
    now = clock()
    with service.sessions() as s:
        run = s.get(m.Run, run_id)
        rnd = s.get(m.Round, (run_id, 0))
        apply_effects(s, run, rnd, [MarkMissed((nodes[0],))])
        s.commit()
    assert assignment_statuses(service, run_id)[nodes[0]] is AssignmentStatus.MISSED
    with service.sessions() as s:
        run = s.get(m.Run, run_id)
        rnd = s.get(m.Round, (run_id, 0))
        apply_effects(s, run, rnd, [MissOutstanding(), Replan(attempt=1, deadline_at=None)])
        s.commit()
        s.refresh(rnd)
        assert (rnd.status, rnd.attempt, rnd.opened_at, rnd.deadline_at) == (
            RoundStatus.PENDING,
            1,
            None,
            None,
        )
    assert set(assignment_statuses(service, run_id).values()) == {AssignmentStatus.MISSED}
    reason = "epsilon budget: (a test)"
    with service.sessions() as s:
        run = s.get(m.Run, run_id)
        rnd = s.get(m.Round, (run_id, 0))
        apply_effects(s, run, rnd, [FinishRun(reason, FinishSource.PRIVACY, now)])
        s.commit()
        assert (run.status, run.status_reason, run.finished_at) == (
            RunState.FINISHED,
            reason,
            now,
        )
        assert s.get(m.PrivacyRun, run_id).stop_reason == reason
        # only an active run finishes: a second finish is a bug, refused before any write
        with pytest.raises(IllegalEvent):
            apply_effects(s, run, rnd, [FinishRun("again", FinishSource.BUDGET, now)])


def test_a_round_at_its_deadline_waits_for_an_upload_the_hub_received_in_time(hub):
    """An upload that reached the hub before the deadline but is still queued in it holds the
    close (the deadline is the nodes', not the hub's queue's); once it is decided, or when the
    grace runs out, the tick decides as before."""
    service, clock, run_id, nodes = hub
    with service.sessions() as s:
        deadline_at = s.get(m.Round, (run_id, 0)).deadline_at
    clock.advance(deadline_at - 1.0 - clock())
    for node_id in nodes:
        service.membership.heartbeat(node_id, "training")
    with service.arriving.receiving(run_id, clock()):
        clock.advance(2.0)
        assert service.ticker.tick() == []  # waits: the upload is still being decided
        with service.sessions() as s:
            assert s.get(m.Round, (run_id, 0)).status is RoundStatus.OPEN
    assert service.ticker.tick() == [(run_id, Decision.REPLAN)]  # decided (here: never stored)


def test_an_ask_s_effects_open_the_round_and_write_the_assignment(hub):
    service, clock, run_id, nodes = hub
    now = clock()
    with service.sessions() as s:  # back to pending, every place given up
        run, rnd = s.get(m.Run, run_id), s.get(m.Round, (run_id, 0))
        apply_effects(s, run, rnd, [MissOutstanding(), Replan(attempt=1, deadline_at=None)])
        s.commit()
    with service.sessions() as s:
        run, rnd = s.get(m.Run, run_id), s.get(m.Round, (run_id, 0))
        snap = row_snapshot(run, rnd)
        assert (snap.status, snap.attempt, snap.deadline_at) == (RoundStatus.PENDING, 1, None)
        effects = [OpenRound(now, now + 60.0), Assign(nodes[0], 1, 0, 3, now, now + 60.0)]
        applied = apply_effects(s, run, rnd, effects)
        s.commit()
        (row,) = applied.assignments
        assert (rnd.status, rnd.opened_at, rnd.deadline_at) == (RoundStatus.OPEN, now, now + 60)
        with pytest.raises(IllegalEvent):  # an open round does not open again
            apply_effects(s, run, rnd, [OpenRound(now, now + 60.0)])
    with service.sessions() as s:
        stored = s.get(m.Assignment, row.id)
        assert (stored.node_id, stored.round, stored.attempt, stored.inner_steps) == (
            nodes[0],
            0,
            1,
            3,
        )
        assert stored.status is AssignmentStatus.ASSIGNED and stored.deadline_at == now + 60


def test_an_upload_s_effects_record_it_and_submit_its_assignment_once(hub):
    service, clock, run_id, nodes = hub
    with service.sessions() as s:
        ids = dict(
            s.execute(
                select(m.Assignment.node_id, m.Assignment.id).where(m.Assignment.run_id == run_id)
            ).all()
        )
    meta = claims(ids[nodes[0]], "int8")
    row = ContributionRow("c" * 64, meta.model_dump(), 123, {"region": "hub-says"})
    with service.sessions() as s:
        run, rnd = s.get(m.Run, run_id), s.get(m.Round, (run_id, 0))
        effects = [RecordContribution(ids[nodes[0]], row, clock()), MarkSubmitted(ids[nodes[0]])]
        (contribution,) = apply_effects(s, run, rnd, effects).contributions
        apply_effects(s, run, rnd, [MarkLate(ids[nodes[1]])])
        s.commit()
        # the same upload again is a bug in the caller (the engine refuses it as a duplicate)
        with pytest.raises(IllegalEvent):
            apply_effects(s, run, rnd, [RecordContribution(ids[nodes[0]], row, clock())])
    statuses = assignment_statuses(service, run_id)
    assert statuses[nodes[0]] is AssignmentStatus.SUBMITTED
    assert statuses[nodes[1]] is AssignmentStatus.LATE
    with service.sessions() as s:
        stored = s.get(m.Contribution, "c" * 64)
        assert (stored.node_id, stored.assignment_id, stored.bytes_up) == (
            nodes[0],
            ids[nodes[0]],
            123,
        )
        assert stored.status == ContributionStatus.ACCEPTED and stored.loss_last == 2.5
        assert stored.region == "hub-says"  # the hub's own columns
        assert contribution.id == stored.id


def test_a_leave_releases_outstanding_work_in_every_run_without_a_round(hub):
    service, _clock, run_id, nodes = hub
    with service.sessions() as s:
        run, rnd = s.get(m.Run, run_id), s.get(m.Round, (run_id, 0))
        a0 = s.scalars(select(m.Assignment).where(m.Assignment.node_id == nodes[0])).one()
        apply_effects(s, run, rnd, [MarkSubmitted(a0.id)])
        s.commit()
    with service.sessions() as s:
        with pytest.raises(IllegalEvent):  # a round's effect needs its round
            apply_effects(s, None, None, [MarkMissed((nodes[1],))])
        applied = apply_effects(s, None, None, [ReleaseOutstanding((nodes[0], nodes[1]))])
        s.commit()
    assert applied.released == 1  # the submitted one keeps its place
    statuses = assignment_statuses(service, run_id)
    assert statuses == {
        nodes[0]: AssignmentStatus.SUBMITTED,
        nodes[1]: AssignmentStatus.RELEASED,
        nodes[2]: AssignmentStatus.ASSIGNED,
    }
    # the hub's own leave goes the same way, and frees the place for another ask
    assert service.membership.leave(nodes[2]) == 1
    assert assignment_statuses(service, run_id)[nodes[2]] is AssignmentStatus.RELEASED


def contribute(service, clock, run_id: str, node_ids: list[str]) -> None:
    """Accepted contributions (and submitted assignments) of `node_ids` in round 0."""
    with service.sessions() as s:
        run, rnd = s.get(m.Run, run_id), s.get(m.Round, (run_id, 0))
        for i, node_id in enumerate(node_ids):
            a = s.scalars(select(m.Assignment).where(m.Assignment.node_id == node_id)).one()
            meta = claims(a.id, "secagg")
            row = ContributionRow(f"{i}" * 64, meta.model_dump(), 100)
            apply_effects(
                s, run, rnd, [RecordContribution(a.id, row, clock()), MarkSubmitted(a.id)]
            )
        s.commit()


def contribution_statuses(service, run_id: str) -> dict[str, ContributionStatus]:
    with service.sessions() as s:
        rows = s.execute(
            select(m.Contribution.node_id, m.Contribution.status).where(
                m.Contribution.run_id == run_id
            )
        ).all()
    return dict(rows)


def open_secagg(service, clock, run_id: str) -> float:
    """Round 0's secure aggregation opened by the engine's effects; returns when."""
    now = clock()
    with service.sessions() as s:
        run, rnd = s.get(m.Run, run_id), s.get(m.Round, (run_id, 0))
        with pytest.raises(IllegalEvent):  # the session's config is the caller's crypto
            apply_effects(s, run, rnd, [OpenSecAgg(0, now, now + 30.0)])
        s.rollback()
        run, rnd = s.get(m.Run, run_id), s.get(m.Round, (run_id, 0))
        effects = [MissOutstanding(), OpenSecAgg(rnd.attempt, now, now + 30.0)]
        apply_effects(s, run, rnd, effects, secagg_config='{"config": 1}')
        s.commit()
    return now


def test_the_secagg_effects_open_the_session_and_move_its_stages(hub):
    service, clock, run_id, nodes = hub
    contribute(service, clock, run_id, nodes[:2])
    now = open_secagg(service, clock, run_id)
    assert assignment_statuses(service, run_id)[nodes[2]] is AssignmentStatus.MISSED
    with service.sessions() as s:
        run = s.get(m.Run, run_id)
        rnd, snap = read_snapshot(s, run, heard_since=service.started_at)
        sess = s.get(m.SecAggSession, (run_id, 0))
        assert rnd.status is RoundStatus.SECAGG and snap.secagg_stage == "share"
        assert (sess.attempt, sess.stage, sess.config_json) == (0, "share", '{"config": 1}')
        assert (sess.opened_at, sess.stage_deadline_at, sess.failures) == (now, now + 30.0, 0)
        with pytest.raises(IllegalEvent):  # a stage is never skipped
            apply_effects(s, run, rnd, [AdvanceStage("unmask", now + 60.0)])
        apply_effects(s, run, rnd, [AdvanceStage("mask", now + 60.0)])
        s.commit()
        s.refresh(sess)
        assert (sess.stage, sess.stage_deadline_at) == ("mask", now + 60.0)
        with pytest.raises(IllegalEvent):  # no sum before the unmask stage
            apply_effects(s, run, rnd, [FinishSecAgg((nodes[0],), 1, now)])
        apply_effects(s, run, rnd, [AdvanceStage("unmask", now + 90.0)])
        apply_effects(s, run, rnd, [FinishSecAgg((nodes[0],), 1, now + 5.0)])
        s.commit()
        s.refresh(sess)
        assert (sess.stage, sess.closed_at, sess.survivors, sess.dropped) == (
            "done",
            now + 5.0,
            1,
            1,
        )
    # the contribution missing from the sum is dropped, the survivor's stays accepted
    assert contribution_statuses(service, run_id) == {
        nodes[0]: ContributionStatus.ACCEPTED,
        nodes[1]: ContributionStatus.DROPPED,
    }


def test_a_failed_secagg_attempt_discards_the_rounds_work_and_reopens_it_pending(hub):
    service, clock, run_id, nodes = hub
    contribute(service, clock, run_id, nodes[:2])
    now = open_secagg(service, clock, run_id)
    with service.sessions() as s:
        run, rnd = s.get(m.Run, run_id), s.get(m.Round, (run_id, 0))
        effects = [FailSecAgg("too many dropouts", now + 1.0), Replan(attempt=1, deadline_at=None)]
        apply_effects(s, run, rnd, effects)
        s.commit()
        sess = s.get(m.SecAggSession, (run_id, 0))
        assert (sess.stage, sess.closed_at, sess.failures) == ("failed", now + 1.0, 1)
        assert sess.last_failure == "too many dropouts"
        assert (rnd.status, rnd.attempt, rnd.opened_at, rnd.deadline_at) == (
            RoundStatus.PENDING,
            1,
            None,
            None,
        )
        with pytest.raises(IllegalEvent):  # a pending round runs no secure aggregation
            apply_effects(s, run, rnd, [FailSecAgg("again", now + 2.0)])
    # no contribution is left accepted, and no assignment holds a place
    assert set(contribution_statuses(service, run_id).values()) == {ContributionStatus.DISCARDED}
    assert assignment_statuses(service, run_id) == {
        nodes[0]: AssignmentStatus.DISCARDED,
        nodes[1]: AssignmentStatus.DISCARDED,
        nodes[2]: AssignmentStatus.MISSED,
    }
    # the retrained attempt's session reuses the row and keeps the count of failures
    with service.sessions() as s:
        run, rnd = s.get(m.Run, run_id), s.get(m.Round, (run_id, 0))
        apply_effects(s, run, rnd, [OpenRound(now + 3.0, now + 63.0)])
        apply_effects(s, run, rnd, [OpenSecAgg(1, now + 4.0, now + 34.0)], secagg_config="{}")
        s.commit()
        sess = s.get(m.SecAggSession, (run_id, 0))
        assert (sess.attempt, sess.stage, sess.failures, sess.closed_at) == (1, "share", 1, None)


def test_an_upload_with_a_signed_claim_stores_its_digest_and_ledger_seq_in_its_row(hub):
    """The upload path writes its row and its assignment's move in Core statements, with the
    columns trust adds after the engine decided (the update's digest, the claim's ledger seq);
    another node's upload with that claim is refused and leaves nothing but its strike."""
    service, _clock, run_id, nodes = hub
    numel = service.run_status(run_id)["numel"]
    with service.sessions() as s:
        ids = dict(
            s.execute(
                select(m.Assignment.node_id, m.Assignment.id).where(m.Assignment.run_id == run_id)
            ).all()
        )
    ident = Identity.from_seed(hashlib.sha256(b"store node 0").digest())
    tensors = make_codec("int8").encode(torch.full((numel,), 1e-3))
    meta = claims(ids[nodes[0]], "int8").model_dump()
    meta["claim"] = sign_contribution(ident, run_id, 0, tensors, meta)
    ack = service.uploads.submit(run_id, nodes[0], pack(tensors, meta))
    with service.sessions() as s:
        row = s.get(m.Contribution, ack.contribution_id)
        assert row.update_sha256 == update_sha256(tensors)
        assert row.status == ContributionStatus.ACCEPTED and row.claim_seq is not None
    (entry,) = [e for e in service.trust.ledger.entries(kind=CLAIM_KIND)]
    assert entry.seq == row.claim_seq
    assert assignment_statuses(service, run_id)[nodes[0]] is AssignmentStatus.SUBMITTED
    # node 1 sends node 0's claim with its own upload: refused, nothing of it stored
    other = claims(ids[nodes[1]], "int8").model_dump() | {"claim": meta["claim"]}
    with pytest.raises(HubError) as refused:
        service.uploads.submit(run_id, nodes[1], pack(tensors, other))
    assert refused.value.reason == Refusal.BAD_CLAIM
    assert assignment_statuses(service, run_id)[nodes[1]] is AssignmentStatus.ASSIGNED
    with service.sessions() as s:
        assert s.scalar(select(func.count()).select_from(m.Contribution)) == 1
