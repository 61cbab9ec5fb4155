"""The round ticker skips a run when nothing can have changed it (hub/tick_schedule.py) and
still decides as soon as before: the real service on SQLite with a fake clock, ticked every
0.25 s as its ticker thread does. `FULL_TICK_S` is set out of reach here, so only the events'
marks and the round engine's wake-ups make a run advance: a wrong skip shows as a late
decision, not one hidden by the periodic full tick."""

from __future__ import annotations

from pathlib import Path

import torch
from sqlalchemy import select

from gridswarm.hub import models as m
from gridswarm.hub.rounds import Decision
from gridswarm.hub.service import HubService
from gridswarm.hub.states import AssignmentStatus
from gridswarm.identity import Identity
from gridswarm.protocol import NodeStatus, RegisterRequest
from tests.conftest import tiny_run
from tests.harness import FakeClock, contribute, new_service

TICK_S = 0.25  # the ticker thread's interval (hub/server.py)
MAX_TICKS = 1_000


def start(
    tmp_path: Path, **round_settings: object
) -> tuple[HubService, FakeClock, str, list[tuple[Identity, str]], list[str]]:
    """A hub on a fake clock with one run and two registered nodes; its advances are logged
    (run ids, in order) in the list returned last."""
    torch.set_num_threads(1)
    clock = FakeClock()
    hub = new_service(tmp_path, clock)
    hub.ticks.full_tick_s = 1e9  # no periodic full tick: marks and wake-ups only
    advanced: list[str] = []
    advance = hub.ticker.advance_run

    def logged(run_id: str) -> Decision:
        advanced.append(run_id)
        return advance(run_id)

    hub.ticker.advance_run = logged  # type: ignore[method-assign]
    cfg = tiny_run(round={"deadline_s": 60, "min_nodes": 1, "max_nodes": 2, **round_settings})
    run_id = hub.create_run(Identity.generate().public_key, cfg).run_id
    numel = hub.run_status(run_id)["numel"]
    nodes = []
    for i in range(2):
        ident = Identity.generate()
        request = RegisterRequest(probe_tokens_per_s=1000.0, probe_numel=numel, name=f"n{i}")
        nodes.append((ident, hub.membership.register(ident.public_key, request)))
    return hub, clock, run_id, nodes, advanced


def assignment_status(hub: HubService, run_id: str, node_id: str) -> str:
    with hub.sessions() as s:
        return s.scalars(
            select(m.Assignment.status).where(
                m.Assignment.run_id == run_id, m.Assignment.node_id == node_id
            )
        ).one()


def last_seen(hub: HubService, node_id: str) -> float:
    with hub.sessions() as s:
        return s.get(m.Node, node_id).last_seen_at


def test_a_silent_node_is_lost_at_the_first_tick_past_its_liveness_window(tmp_path: Path) -> None:
    hub, clock, run_id, nodes, advanced = start(tmp_path, quorum=2)
    (_, talker), (_, silent) = nodes
    for _, node_id in nodes:
        assert hub.asks.request_assignment(run_id, node_id).status == "assigned"
    hub.ticker.tick()
    silent_since = last_seen(hub, silent)
    liveness_s = hub.membership.liveness_s()
    ticks, lost_at = 0, None
    while lost_at is None and ticks < MAX_TICKS:
        clock.advance(TICK_S)
        hub.membership.heartbeat(
            talker, NodeStatus.TRAINING
        )  # no event of the round: it changes nothing
        hub.ticker.tick()
        ticks += 1
        if assignment_status(hub, run_id, silent) == AssignmentStatus.MISSED:
            lost_at = clock()
    assert lost_at is not None, "the silent node was never found lost"
    assert silent_since + liveness_s < lost_at <= silent_since + liveness_s + TICK_S
    assert assignment_status(hub, run_id, talker) == AssignmentStatus.ASSIGNED
    # the ticks between were skipped: one advance after the asks, one at the loss (and one
    # after it, the loss being a change)
    assert 2 <= len(advanced) <= 4 < ticks, (advanced, ticks)
    hub.engine.dispose()


def test_a_deadline_closes_the_round_at_the_first_tick_past_it(tmp_path: Path) -> None:
    hub, clock, run_id, nodes, advanced = start(tmp_path, quorum=1)
    (ident, uploader), (_, waiting) = nodes
    contribute(hub, run_id, ident, uploader)  # one of two places in: the quorum, not all-in
    assert hub.asks.request_assignment(run_id, waiting).status == "assigned"
    with hub.sessions() as s:
        deadline_at = s.get(m.Round, (run_id, 0)).deadline_at
    ticks, closed_at = 0, None
    while closed_at is None and ticks < MAX_TICKS:
        clock.advance(TICK_S)
        hub.membership.heartbeat(waiting, NodeStatus.TRAINING)  # alive: only the deadline closes it
        if (run_id, Decision.CLOSE) in hub.ticker.tick():
            closed_at = clock()
        ticks += 1
    assert closed_at is not None, "the round never closed"
    assert deadline_at <= closed_at < deadline_at + TICK_S
    assert hub.run_status(run_id)["version"] == 1
    assert len(advanced) <= 4 < ticks, (advanced, ticks)
    hub.engine.dispose()


def test_an_upload_advances_its_run_at_the_next_tick(tmp_path: Path) -> None:
    """The last upload of a round (all in) closes it at the next tick, not at a wake-up; and a
    run no event touched is not read at all."""
    hub, clock, run_id, nodes, advanced = start(tmp_path, quorum=2)
    contribute(hub, run_id, *nodes[0])
    hub.ticker.tick()
    advanced.clear()
    for _ in range(8):  # nothing happens: nothing is read
        clock.advance(TICK_S)
        assert hub.ticker.tick() == []
    assert advanced == []
    contribute(hub, run_id, *nodes[1])
    clock.advance(TICK_S)
    assert hub.ticker.tick() == [(run_id, Decision.CLOSE)]
    assert hub.run_status(run_id)["version"] == 1
    hub.engine.dispose()


def test_the_periodic_full_tick_advances_a_quiet_run(tmp_path: Path) -> None:
    hub, clock, run_id, nodes, advanced = start(tmp_path, quorum=2)
    hub.ticks.full_tick_s = 2.0
    contribute(hub, run_id, *nodes[0])
    hub.ticker.tick()
    advanced.clear()
    for _ in range(int(2.0 / TICK_S)):
        clock.advance(TICK_S)
        hub.ticker.tick()
    assert advanced == [run_id]  # once, at 2 s
    hub.engine.dispose()


def test_prescreening_runs_after_an_upload_until_it_finds_nothing(tmp_path: Path) -> None:
    hub, clock, run_id, nodes, _ = start(tmp_path, quorum=2)
    examined: list[int] = []
    prescreen = hub.trust.prescreen

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        examined.append(prescreen(*args, **kwargs))
        return examined[-1]

    hub.trust.prescreen = counted  # type: ignore[method-assign]
    for _ in range(3):
        clock.advance(TICK_S)
        hub.ticker.tick()
    assert examined == [0]  # once at the start (nothing known), then not while nothing comes
    contribute(hub, run_id, *nodes[0])
    for _ in range(4):
        clock.advance(TICK_S)
        hub.ticker.tick()
    assert examined == [0, 1, 0]  # the upload's verdict, then one look that finds nothing
    hub.engine.dispose()
