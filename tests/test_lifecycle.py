"""Run lifecycle: the pure state machine, and the hub applying it (in process, injected clock)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gridswarm.hub import models as m
from gridswarm.hub.lifecycle import (
    STALL_AFTER_FAILURES,
    Refused,
    RunEvent,
    RunState,
    TransitionRefusal,
    transition,
)
from gridswarm.hub.server import build_service
from gridswarm.hub.service import HubError, HubService, HubSettings
from gridswarm.identity import Identity
from gridswarm.ledger.ops import fund_claim
from gridswarm.protocol import FailureReport, RegisterRequest
from tests.conftest import tiny_run

S, E = RunState, RunEvent


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [
        (S.ACTIVE, E.PAUSE, S.PAUSED),
        (S.ACTIVE, E.STALL, S.STALLED),
        (S.ACTIVE, E.STOP, S.STOPPED),
        (S.ACTIVE, E.FINISH, S.FINISHED),
        (S.PAUSED, E.RESUME, S.ACTIVE),
        (S.STALLED, E.RESUME, S.ACTIVE),
        (S.PAUSED, E.STOP, S.STOPPED),
        (S.STALLED, E.STOP, S.STOPPED),
        (S.ACTIVE, E.RESUME, TransitionRefusal.NOT_HELD),
        (S.PAUSED, E.PAUSE, TransitionRefusal.NOT_ACTIVE),
        (S.STALLED, E.FINISH, TransitionRefusal.NOT_ACTIVE),
        (S.STOPPED, E.RESUME, TransitionRefusal.ALREADY_ENDED),
        (S.FINISHED, E.STOP, TransitionRefusal.ALREADY_ENDED),
        (S.STOPPED, E.STOP, TransitionRefusal.ALREADY_ENDED),
    ],
)
def test_transition_table(state: RunState, event: RunEvent, expected: object) -> None:
    got = transition(state, event)
    if isinstance(expected, TransitionRefusal):
        assert isinstance(got, Refused) and got.reason is expected
        assert str(state) in got.detail and str(event) in got.detail
    else:
        assert got is expected


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def hub(tmp_path: Path) -> tuple[HubService, Clock]:
    clock = Clock()
    service = build_service(f"sqlite:///{tmp_path / 'hub.db'}", tmp_path / "blobs", HubSettings())
    service.clock = service.trust.clock = clock
    return service, clock


def register(service: HubService, name: str) -> str:
    ident = Identity.from_seed(name.encode())
    req = RegisterRequest(probe_tokens_per_s=5_000.0, probe_numel=100_000, name=name)
    return service.membership.register(ident.public_key, req)


def lifecycle_entries(service: HubService) -> list[dict]:
    return [e.payload for e in service.trust.ledger.entries(kind="lifecycle")]


def test_stop_releases_work_records_why_and_leaves_the_escrow_to_the_sponsor(hub) -> None:
    service, clock = hub
    sponsor = Identity.from_seed(b"sponsor")
    run_id = service.create_run(sponsor.public_key, tiny_run()).run_id
    claim = fund_claim(sponsor, 1000, run_id=run_id).to_dict()
    service.trust.fund(run_id, sponsor.public_key, claim)
    node = register(service, "n0")
    answer = service.asks.request_assignment(run_id, node)
    assert answer.status == "assigned"

    with pytest.raises(HubError) as refused:  # only the sponsor may stop it
        service.change_run_state(run_id, Identity.from_seed(b"x").public_key, E.STOP, "mine now")
    assert refused.value.status == 403

    clock.now += 1
    entry = service.change_run_state(run_id, sponsor.public_key, E.STOP, "budget cut")
    assert entry["from"] == "active" and entry["to"] == "stopped"
    assert entry["released_assignments"] == 1
    assert entry["unspent_escrow_units"] == 1000 and entry["sponsor"] == sponsor.public_key.hex()
    assert lifecycle_entries(service) == [entry]
    status = service.run_status(run_id)
    assert status["status"] == "stopped" and status["status_reason"] == "budget cut"
    assert status["trust"]["escrow_units"] == 1000  # nothing paid out of it after the stop
    after = service.asks.request_assignment(run_id, node)  # the node is told at its next request
    assert after.status == "finished" and "stopped: budget cut" in after.reason
    with pytest.raises(HubError) as again:
        service.change_run_state(run_id, sponsor.public_key, E.RESUME)
    assert again.value.status == 409 and "already-ended" in again.value.detail
    assert service.trust.verify()["ok"]


def test_pause_holds_the_run_and_resume_continues_where_it_was(hub) -> None:
    service, clock = hub
    sponsor = Identity.from_seed(b"sponsor")
    run_id = service.create_run(sponsor.public_key, tiny_run()).run_id
    node = register(service, "n0")
    first = service.asks.request_assignment(run_id, node).assignment
    service.change_run_state(run_id, sponsor.public_key, E.PAUSE)
    held = service.asks.request_assignment(run_id, node)
    assert held.status == "wait" and "paused" in held.reason
    clock.now += 3600  # far past the round's deadline: the pause does not eat it
    assert service.ticker.tick() == []  # a held run does not advance
    service.change_run_state(run_id, sponsor.public_key, E.RESUME)
    again = service.asks.request_assignment(run_id, node).assignment
    assert (again.round, again.base_version) == (first.round, first.base_version)
    assert again.deadline_at > clock.now
    assert [e["to"] for e in lifecycle_entries(service)] == ["paused", "active"]


def test_failures_mark_the_run_stalled_with_the_reason(hub) -> None:
    service, clock = hub
    sponsor = Identity.from_seed(b"sponsor")
    run_id = service.create_run(sponsor.public_key, tiny_run()).run_id
    node = register(service, "n0")
    for i in range(STALL_AFTER_FAILURES):
        a = service.asks.request_assignment(run_id, node).assignment
        assert a is not None, f"failure {i}: the run should still hand out work"
        clock.now += 1
        report = FailureReport(assignment_id=a.id, reason="FileNotFoundError: no dataset here")
        result = service.report_failure(run_id, node, report)
    assert result == {"run_status": "stalled", "failures": STALL_AFTER_FAILURES}
    status = service.run_status(run_id)
    assert status["status"] == "stalled"
    assert "no dataset here" in status["status_reason"] and node in status["status_reason"]
    (row,) = status["nodes"]
    assert row["failures"] == STALL_AFTER_FAILURES and row["state"] == "live"
    assert row["last_failure"] == "FileNotFoundError: no dataset here"
    assert service.asks.request_assignment(run_id, node).status == "wait"
    with service.sessions() as s:
        assert {a.status for a in s.query(m.Assignment)} == {"failed"}
    # resuming starts the count again: one more failure does not stall it at once
    service.change_run_state(run_id, sponsor.public_key, E.RESUME, "dataset copied")
    assert service.run_status(run_id)["status_reason"] is None
    clock.now += 1
    a = service.asks.request_assignment(run_id, node).assignment
    report = FailureReport(assignment_id=a.id, reason="still missing")
    assert service.report_failure(run_id, node, report)["run_status"] == "active"
    other = register(service, "n1")
    with pytest.raises(HubError) as foreign:  # a node reports only its own assignments
        service.report_failure(run_id, other, report)
    assert foreign.value.status == 403


def test_one_broken_node_does_not_stall_a_run_others_train(hub) -> None:
    service, clock = hub
    sponsor = Identity.from_seed(b"sponsor")
    run_id = service.create_run(sponsor.public_key, tiny_run(round={"max_nodes": 2})).run_id
    healthy, broken = register(service, "healthy"), register(service, "broken")
    assert service.asks.request_assignment(run_id, healthy).status == "assigned"
    for _ in range(STALL_AFTER_FAILURES + 2):
        a = service.asks.request_assignment(run_id, broken).assignment
        clock.now += 1
        report = FailureReport(assignment_id=a.id, reason="MemoryError: model does not fit")
        assert service.report_failure(run_id, broken, report)["run_status"] == "active"
