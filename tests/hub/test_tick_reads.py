"""The ticker's round advance (`Ticker.advance_run`, hub/ticker.py) on a real SQLite hub: a tick
that finds nothing to close reads the round once, under the lock (no `_prepare_close` read beside
it), and a tick at a due close still computes the new version outside the lock and publishes it;
the close reads its newcomers' reputations at once, not one by one."""

from __future__ import annotations

from pathlib import Path

import torch
from sqlalchemy import event, select

from gridswarm.hub import models as m
from gridswarm.hub.rounds import Decision
from gridswarm.hub.server import build_service
from gridswarm.identity import Identity
from gridswarm.protocol import RegisterRequest
from tests.conftest import tiny_run
from tests.harness import contribute


def test_ticks_read_the_round_once_and_a_due_close_is_prepared_outside_the_lock(
    tmp_path: Path,
) -> None:
    torch.set_num_threads(1)
    hub = build_service(f"sqlite:///{tmp_path / 'hub.db'}", tmp_path / "blobs", home=tmp_path)
    calls: list[str] = []  # the advance's steps, in order
    in_advance = [False]  # inside `advance`: under the service lock (an RLock)
    ticker = hub.ticker
    advance, prepare, new_version = ticker.advance, ticker._prepare_close, ticker._new_version

    def advancing(*args, **kwargs):  # type: ignore[no-untyped-def]
        in_advance[0] = True
        try:
            return advance(*args, **kwargs)
        finally:
            in_advance[0] = False

    def preparing(run_id: str) -> None:
        calls.append("prepare")
        prepare(run_id)

    def versioning(run, *args):  # type: ignore[no-untyped-def]
        before = ticker._prepared.get(run.id)
        new = new_version(run, *args)
        where = "locked" if in_advance[0] else "unlocked"
        calls.append(f"version {where}" + (" (prepared)" if new is before else ""))
        return new

    ticker.advance, ticker._prepare_close = advancing, preparing  # type: ignore[method-assign]
    ticker._new_version = versioning  # type: ignore[method-assign]
    cfg = tiny_run(round={"deadline_s": 120, "quorum": 2, "min_nodes": 2, "max_nodes": 2})
    run_id = hub.create_run(Identity.generate().public_key, cfg).run_id
    numel = hub.run_status(run_id)["numel"]
    nodes = []
    for i in range(2):
        ident = Identity.generate()
        request = RegisterRequest(probe_tokens_per_s=1000.0, probe_numel=numel, name=f"n{i}")
        nodes.append((ident, hub.membership.register(ident.public_key, request)))

    contribute(hub, run_id, *nodes[0])
    for _ in range(3):  # one of two places submitted: nothing to close, nothing prepared
        assert ticker.advance_run(run_id) is Decision.WAIT
    assert calls == []

    contribute(hub, run_id, *nodes[1])
    assert ticker.advance_run(run_id) is Decision.CLOSE
    # computed once, outside the lock, and taken by the close under it
    assert calls == ["prepare", "version unlocked", "version locked (prepared)"]
    with hub.sessions() as s:
        versions = s.scalars(select(m.Version.number).where(m.Version.run_id == run_id)).all()
        assert sorted(versions) == [0, 1]
        assert s.get(m.Run, run_id).version == 1  # the next round, on the new version
    assert ticker.advance_run(run_id) is Decision.WAIT  # the next round: nothing due
    assert len(calls) == 3
    hub.engine.dispose()


def test_a_close_reads_its_newcomers_reputations_at_once(tmp_path: Path) -> None:
    """Settling a round of nodes without a reputation row yet reads the reputation table a
    fixed number of times (the settlement's read, the write's read), not once per node with a
    flush of the row added before it (`store.trust.write_reputations`)."""
    torch.set_num_threads(1)
    hub = build_service(f"sqlite:///{tmp_path / 'hub.db'}", tmp_path / "blobs", home=tmp_path)
    n = 6
    cfg = tiny_run(round={"deadline_s": 120, "quorum": n, "min_nodes": n, "max_nodes": n})
    run_id = hub.create_run(Identity.generate().public_key, cfg).run_id
    numel = hub.run_status(run_id)["numel"]
    nodes = []
    for i in range(n):  # all live before the round hands out its places (min_nodes)
        ident = Identity.generate()
        request = RegisterRequest(probe_tokens_per_s=1000.0, probe_numel=numel, name=f"n{i}")
        nodes.append((ident, hub.membership.register(ident.public_key, request)))
    for ident, node_id in nodes:
        contribute(hub, run_id, ident, node_id)
    statements: list[str] = []

    def record(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    event.listen(hub.engine, "before_cursor_execute", record)
    assert hub.ticker.advance_run(run_id) is Decision.CLOSE
    event.remove(hub.engine, "before_cursor_execute", record)
    reads = [q for q in statements if q.startswith("SELECT") and "FROM node_reputation" in q]
    writes = [q for q in statements if q.startswith("INSERT INTO node_reputation")]
    assert 1 <= len(reads) <= 3, reads  # one per node before (6 here, 10,000 at scale)
    assert len(writes) == 1  # the new rows in one executemany
    with hub.sessions() as s:
        assert len(s.scalars(select(m.NodeReputation.node_id)).all()) == n
    hub.engine.dispose()
