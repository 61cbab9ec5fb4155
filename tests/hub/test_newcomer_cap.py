"""The sponsor's cap on never-worked nodes per round (`round.max_newcomer_share`): the real hub
service on SQLite with a fake clock (tests/harness.py `new_service`), asks decided one by one
and in one batch (one transaction: the places it gives are not flushed until its commit), and
a config that would keep a new hub from starting refused at run creation (422)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from gridswarm.hub.errors import HubError
from gridswarm.hub.service import HubService
from gridswarm.identity import Identity
from gridswarm.protocol import (
    API,
    Assignment,
    AssignmentResponse,
    ContributionMeta,
    NodeStatus,
    Refusal,
    RegisterRequest,
)
from gridswarm.train.codecs import make_codec
from gridswarm.train.params import pack
from gridswarm.trust.policy import NEWCOMER_PLACES_FULL
from tests.conftest import tiny_run
from tests.harness import FakeClock, new_service
from tests.hub.harness import Hub, meta_fields

NO_AUDITS = {"audit_max_rate": 0, "audit_min_rate": 0}  # a run the hub cannot replay
TOKENS_PER_STEP = 32 * 8  # tiny_run: seq_len x batch_size
# 8 places, of which ceil(0.25 x 8) = 2 for nodes that have never worked on this hub
ROUND = {"deadline_s": 30, "quorum": 2, "min_nodes": 1, "max_nodes": 8, "max_newcomer_share": 0.25}


def register(service: HubService, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        request = RegisterRequest(probe_tokens_per_s=1e5, probe_numel=1000)
        ids.append(service.membership.register(Identity.generate().public_key, request))
    return ids


def answers(service: HubService, run_id: str, node_ids: list[str]) -> list[AssignmentResponse]:
    """The hub's answers to `node_ids` asking for work, decided in one batch in that order."""
    out = []
    for answer in service.asks.assignments_or_wait(run_id, node_ids):
        assert not isinstance(answer, HubError), answer
        out.append(answer[0])
    return out


def upload(service: HubService, run_id: str, node_id: str, a: Assignment) -> None:
    """A small random update of its own for assignment `a` (two are never the same)."""
    numel = service.run_status(run_id)["numel"]
    update = torch.randn(numel, generator=torch.Generator().manual_seed(int(a.id[:8], 16))) * 1e-3
    meta = ContributionMeta(**meta_fields(a, TOKENS_PER_STEP)).model_dump()
    service.uploads.submit(run_id, node_id, pack(make_codec("int8").encode(update), meta))


def assigned(responses: list[AssignmentResponse]) -> list[bool]:
    return [r.status == "assigned" for r in responses]


def capped(caplog: pytest.LogCaptureFixture, node_ids: list[str]) -> set[str]:
    """Those of `node_ids` the hub logged as waiting for the newcomer cap (the cause of a wait
    is for logs only: the node is told to wait, as for a full round)."""
    return {
        n
        for n in node_ids
        for rec in caplog.records
        if rec.name == "gridswarm.hub.trust"
        and f": {n} waits: {NEWCOMER_PLACES_FULL}" in rec.getMessage()
    }


def test_a_flood_of_new_keys_holds_at_most_the_newcomer_share(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.set_num_threads(1)
    caplog.set_level(logging.DEBUG, logger="gridswarm.hub.trust")
    clock = FakeClock()
    service = new_service(tmp_path, clock)
    cfg = tiny_run(round=ROUND, trust=dict(NO_AUDITS), budget={"rounds": 5})
    run_id = service.create_run(Identity.generate().public_key, cfg).run_id

    # a hub where nobody has worked yet: newcomers alone open and close round 0, two of them
    first = register(service, 3)
    got = [service.asks.request_assignment(run_id, n) for n in first]
    assert assigned(got) == [True, True, False]
    assert got[2].status == "wait" and capped(caplog, first) == {first[2]}
    assert "(2 of 2," in caplog.text
    for node_id, answer in zip(first[:2], got[:2], strict=True):
        upload(service, run_id, node_id, answer.assignment)
    service.ticker.tick()
    assert service.run_status(run_id)["version"] == 1
    worked = first[:2]  # the third never took a place: still a newcomer

    # round 1: a flood of 30 new keys. One worked node opens the round, the flood asks in the
    # same batch (its places are not flushed yet), the other worked node asks last
    flood = [first[2], *register(service, 30)]
    caplog.clear()
    got = answers(service, run_id, [worked[0], *flood, worked[1]])
    assert got[0].status == "assigned" and got[-1].status == "assigned"  # worked: never capped
    flood_got = got[1:-1]
    assert sum(assigned(flood_got)) == 2  # the cap, though 5 more places are free
    placed = {n: r.assignment for n, r in zip(flood, flood_got, strict=True) if r.assignment}
    assert all(r.status == "wait" for r in flood_got if r.assignment is None)
    assert capped(caplog, flood) == set(flood) - set(placed)  # each waits for the cap
    # asked again one at a time (the round's places as stored): still no third newcomer
    waiting = [n for n in flood if n not in placed]
    assert not any(assigned([service.asks.request_assignment(run_id, n) for n in waiting]))
    for node_id, answer in zip(worked, [got[0], got[-1]], strict=True):
        upload(service, run_id, node_id, answer.assignment)
    for node_id, a in placed.items():
        upload(service, run_id, node_id, a)
    service.ticker.tick()
    assert service.run_status(run_id)["version"] == 2

    # round 2: the two newcomers of round 1 have worked now; two new ones may join them
    clock.advance(16)  # past the pending round's grace for worked nodes
    for node_id in [*worked, *flood]:
        service.membership.heartbeat(node_id, NodeStatus.IDLE)
    service.ticker.tick()  # writes the heartbeats
    got = answers(service, run_id, [*flood, *worked])  # newcomers first: one opens the round
    by_node = dict(zip([*flood, *worked], got, strict=True))
    assert all(by_node[n].status == "assigned" for n in [*placed, *worked])  # 4 worked nodes
    fresh = [n for n in flood if n not in placed and by_node[n].status == "assigned"]
    assert len(fresh) == 2  # and two newcomers, of the 29 asking


def test_the_default_share_leaves_rounds_as_before(tmp_path: Path) -> None:
    clock = FakeClock()
    service = new_service(tmp_path, clock)
    rounds = {k: v for k, v in ROUND.items() if k != "max_newcomer_share"}
    run_id = service.create_run(
        Identity.generate().public_key, tiny_run(round=rounds, trust=dict(NO_AUDITS))
    ).run_id
    nodes = register(service, 10)
    assert sum(assigned(answers(service, run_id, nodes))) == 8  # every place, all newcomers


@pytest.mark.parametrize(
    ("share", "why"),
    [
        (math.nan, "finite number"),
        (-0.1, "greater than or equal to 0"),
        (1.5, "less than or equal to 1"),
        (0.1, "max_newcomer_share: 1 < min_nodes/quorum 2"),  # a new hub could never start
    ],
)
def test_a_bad_share_is_refused_at_run_creation(tmp_path: Path, share: float, why: str) -> None:
    hub = Hub(tmp_path)
    sponsor = Identity.generate()
    cfg = tiny_run(round=ROUND | {"max_newcomer_share": share})
    body = json.dumps({"config": cfg}).encode()  # NaN travels as the bare token NaN
    before = hub.snapshot()
    r = hub.post(sponsor, f"{API}/runs", body)
    assert r.status_code == 422, r.text
    assert r.json()["reason"] == Refusal.INVALID_CONFIG
    assert "max_newcomer_share" in r.json()["detail"] and why in r.json()["detail"]
    assert hub.snapshot() == before  # nothing stored
