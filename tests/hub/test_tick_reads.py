"""The ticker's round advance (`Ticker.advance_run`, hub/ticker.py) on a real SQLite hub: a tick
that finds nothing to close reads the round once, under the lock (no `_prepare_close` read beside
it), and a tick at a due close still computes the new version outside the lock and publishes it."""

from __future__ import annotations

from pathlib import Path

import torch
from sqlalchemy import select

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
