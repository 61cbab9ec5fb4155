"""Hub replicas on one PostgreSQL: several `HubService`s (as several processes would have) race
for the same decisions, and the database's row locks make exactly one of them take each."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from gridswarm.config import RunConfig
from gridswarm.hub import models as m
from gridswarm.hub.rounds import Decision
from gridswarm.hub.server import build_service
from gridswarm.hub.service import HubService
from gridswarm.identity import Identity
from gridswarm.ledger.log import LedgerEntryRow
from gridswarm.protocol import RegisterRequest
from gridswarm.train.codecs import make_codec
from gridswarm.train.workload import Workload
from tests.conftest import tiny_run, wait_for
from tests.harness import contribute, train_and_pack

pytestmark = [pytest.mark.postgres, pytest.mark.slow]  # a PostgreSQL server: the full suite


@pytest.fixture
def replicas(pg_database: str, tmp_path: Path) -> Iterator[Callable[[int], list[HubService]]]:
    """`count` hub services on one database and one blob folder (one hub key), as processes;
    their leases and connections are given back at teardown (the server's slots are shared)."""
    made: list[HubService] = []

    def make(count: int) -> list[HubService]:
        made.extend(
            build_service(pg_database, tmp_path / "blobs", home=tmp_path) for _ in range(count)
        )
        return made[-count:]

    yield make
    for hub in made:
        hub.ticker.lease.release()
        hub.engine.dispose()


def test_three_replicas_race_to_close_one_round_and_exactly_one_publishes(replicas):
    torch.set_num_threads(1)
    hubs = replicas(3)
    sponsor = Identity.generate()
    cfg = tiny_run(round={"deadline_s": 120, "quorum": 2, "min_nodes": 2, "max_nodes": 2})
    run_id = hubs[0].create_run(sponsor.public_key, cfg).run_id
    numel = hubs[0].run_status(run_id)["numel"]
    nodes = []
    for i, hub in enumerate(hubs[:2]):  # each node registers with, and works through, its replica
        ident = Identity.generate()
        request = RegisterRequest(probe_tokens_per_s=1000.0, probe_numel=numel, name=f"n{i}")
        nodes.append((hub, ident, hub.membership.register(ident.public_key, request)))
    for hub, ident, node_id in nodes:
        contribute(hub, run_id, ident, node_id)

    barrier = threading.Barrier(len(hubs))
    decisions: list[Decision] = []
    errors: list[BaseException] = []

    def race(hub: HubService) -> None:
        try:
            barrier.wait(timeout=30)
            decisions.append(hub.ticker.advance_run(run_id))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(hub,)) for hub in hubs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(decisions) == sorted([Decision.CLOSE, Decision.WAIT, Decision.WAIT])

    with hubs[0].sessions() as s:
        versions = s.scalars(
            select(m.Version.number).where(m.Version.run_id == run_id).order_by(m.Version.number)
        ).all()
        rounds = {r.number: r.status for r in s.scalars(select(m.Round))}
        run = s.get(m.Run, run_id)
        accepted = s.scalar(select(func.count()).select_from(m.Contribution))
        closes = [
            payload
            for e in s.scalars(select(LedgerEntryRow).where(LedgerEntryRow.kind == "round"))
            if (payload := json.loads(e.payload_json))["event"] == "close"
        ]
    assert versions == [0, 1]  # exactly one replica published version 1
    assert (run.version, run.round) == (1, 1)
    assert rounds == {0: "closed", 1: "pending"}
    assert accepted == 2
    assert [(c["round"], c["version"]) for c in closes] == [(0, 1)]  # one close on the ledger
    assert hubs[1].trust.verify()["ok"] is True
    for hub in hubs:  # no replica counted a failed advance (a lost race would be one)
        assert hub.ticker._failures == {}


def test_replicas_racing_a_flood_of_new_keys_keep_the_newcomer_cap(replicas):
    """Two replicas decide batches of asks from 16 never-worked nodes at once: the run's row
    lock serializes the batches, so the round's 8 places hold exactly ceil(0.25 x 8) = 2 of
    them (the count is the database's, PostgreSQL's here)."""
    hubs = replicas(2)
    rounds = {"deadline_s": 120, "quorum": 1, "min_nodes": 1, "max_nodes": 8}
    cfg = tiny_run(round=rounds | {"max_newcomer_share": 0.25})
    run_id = hubs[0].create_run(Identity.generate().public_key, cfg).run_id
    request = RegisterRequest(probe_tokens_per_s=1e5, probe_numel=1000)
    ids = [
        hubs[i % 2].membership.register(Identity.generate().public_key, request) for i in range(16)
    ]
    batches = [(hubs[i % 2], ids[i : i + 2]) for i in range(0, 16, 2)]
    barrier = threading.Barrier(len(batches))
    answers: list = []
    errors: list[BaseException] = []

    def ask(hub: HubService, node_ids: list[str]) -> None:
        try:
            barrier.wait(timeout=30)
            answers.extend(hub.asks.assignments_or_wait(run_id, node_ids))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=batch) for batch in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(answers) == 16
    assert sum(a[0].status == "assigned" for a in answers) == 2
    with hubs[0].sessions() as s:
        held = s.scalar(select(func.count()).where(m.Assignment.run_id == run_id))
    assert held == 2


def test_one_replica_holds_the_ticker_lease_and_another_takes_it_over(replicas):
    """PostgreSQL frees a closed connection's advisory lock when that session's backend has
    ended, a moment after the client closed it (an earlier test's lease, or `release()` here):
    so the lease is taken at a later try, as the ticker does, not necessarily at the first."""
    hubs = replicas(2)
    wait_for(lambda: hubs[0].ticker.lease.held(), 30, "the first replica to take the free lease")
    assert not hubs[1].ticker.lease.held()
    assert hubs[0].ticker.lease.held() and not hubs[1].ticker.lease.held()  # asked again: unchanged
    hubs[0].ticker.lease.release()  # as when its process dies: the connection and the lock go
    wait_for(lambda: hubs[1].ticker.lease.held(), 30, "the other replica to take the lease over")
    assert not hubs[0].ticker.lease.held()


def test_a_hung_lease_holder_loses_the_lease(replicas):
    """A holder that stops ticking (stopped, stuck) but whose process and connection live: once
    its lease connection has been silent for `stale_after_s`, another replica ends its session
    and takes the lease; the hung one finds out when it wakes."""
    hung, other = replicas(2)
    assert hung.ticker.lease.held() and not other.ticker.lease.held()
    other.ticker.lease.stale_after_s = 0.5
    assert not other.ticker.lease.held()  # silent for less than that: left alone
    time.sleep(0.8)  # `hung` does not tick: its lease connection says nothing
    took = wait_for(lambda: other.ticker.lease.held(), 30, "the lease to move")
    assert took and other.ticker.lease.terms == 1
    assert not hung.ticker.lease.held()  # its session was ended: no lease, not taken back
    assert hung.ticker.lease.conn is None


def test_an_upload_to_another_replica_closes_the_round_at_the_lease_holders_next_tick(replicas):
    """The lease holder's ticker skips a run nothing changed (hub/tick_schedule.py); an upload
    taken by another replica is seen by its `RoundWatch` and closes the round at its next
    tick, with no periodic full tick to fall back on."""
    torch.set_num_threads(1)
    holder, other = replicas(2)
    wait_for(lambda: holder.ticker.lease.held(), 30, "the first replica to take the free lease")
    holder.ticks.full_tick_s = 1e9  # marks and wake-ups only
    advanced: list[str] = []
    advance = holder.ticker.advance_run

    def logged(run_id: str) -> Decision:
        advanced.append(run_id)
        return advance(run_id)

    holder.ticker.advance_run = logged  # type: ignore[method-assign]
    cfg = tiny_run(round={"deadline_s": 300, "quorum": 2, "min_nodes": 2, "max_nodes": 2})
    run_id = holder.create_run(Identity.generate().public_key, cfg).run_id
    numel = holder.run_status(run_id)["numel"]
    nodes = []
    for i, hub in enumerate((holder, other)):
        ident = Identity.generate()
        request = RegisterRequest(probe_tokens_per_s=1000.0, probe_numel=numel, name=f"n{i}")
        nodes.append((ident, hub.membership.register(ident.public_key, request)))
    contribute(holder, run_id, *nodes[0])
    ident, node_id = nodes[1]
    answer = other.asks.request_assignment(run_id, node_id)  # through the other replica
    assert answer.status == "assigned" and answer.assignment is not None
    assert holder.ticker.tick() == []  # both places taken, one submitted: it waits
    advanced.clear()
    for _ in range(3):
        assert holder.ticker.tick() == []
    assert advanced == []  # nothing changed it: not read
    workload = Workload.from_config(RunConfig.model_validate(answer.assignment.config))
    codec = make_codec(workload.cfg.comm.codec, workload.cfg.comm.block_size)
    body = train_and_pack(other, run_id, ident, node_id, answer.assignment, workload, codec)
    other.uploads.submit(run_id, node_id, body)  # all in, on the other replica
    assert holder.ticker.tick() == [(run_id, Decision.CLOSE)]
    assert holder.run_status(run_id)["version"] == 1
