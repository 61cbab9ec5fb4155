"""The hub's hot paths under many nodes: asking for work costs the same whatever the swarm's
size, long-polls sleep until the round changes instead of asking again, heartbeats are one
UPDATE. In-process hub on a temporary SQLite with an injected clock (bench/hub_load.py measures
the real process)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select

from gridswarm.hub.app import create_app
from gridswarm.hub.asks import SPEED_WINDOW
from gridswarm.hub.models import Assignment, Contribution, Node, Nonce, Run
from gridswarm.hub.scheduler import update_speed
from gridswarm.hub.server import build_service
from gridswarm.hub.service import HubError, HubService, HubSettings
from gridswarm.identity import Identity, sign_request
from gridswarm.protocol import API, RegisterRequest
from tests.conftest import tiny_run


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def hub(tmp_path: Path, clock=time.time) -> HubService:
    service = build_service(f"sqlite:///{tmp_path / 'hub.db'}", tmp_path / "blobs")
    service.clock = clock
    service.trust.clock = clock
    return service


def register(service: HubService, probe_tokens_per_s: float = 1e6) -> str:
    key = Identity.generate().public_key
    return service.membership.register(
        key, RegisterRequest(probe_tokens_per_s=probe_tokens_per_s, probe_numel=1000)
    )


def statements_of(service: HubService, call) -> int:
    """SQL statements `call()` sends to the database."""
    engine = service.sessions.kw["bind"]
    count = 0

    def counted(*_args) -> None:
        nonlocal count
        count += 1

    event.listen(engine, "before_cursor_execute", counted)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", counted)
    return count


@pytest.mark.parametrize("swarm", [10, 300])
def test_asking_for_work_does_not_grow_with_the_swarm(tmp_path: Path, swarm: int) -> None:
    clock = FakeClock()
    service = hub(tmp_path, clock)
    nodes = [register(service) for _ in range(swarm)]
    run = service.create_run(b"\x01" * 32, tiny_run(round={"max_nodes": 1000, "deadline_s": 60}))
    assert service.asks.request_assignment(run.run_id, nodes[0]).status == "assigned"  # warm caches
    answer = []
    cost = statements_of(
        service, lambda: answer.append(service.asks.request_assignment(run.run_id, nodes[1]))
    )
    assert answer[0].status == "assigned"
    # 10 today (12 before an assignment's version blobs were kept in memory)
    assert cost <= 12, f"{cost} statements to assign one node in a swarm of {swarm}"
    # the one holding a place asks again (its answer was lost): the same work, at no more cost
    repeated = []
    again = statements_of(
        service, lambda: repeated.append(service.asks.request_assignment(run.run_id, nodes[1]))
    )
    assert repeated[0].assignment.id == answer[0].assignment.id
    assert again <= cost


def test_fastest_node_sets_the_pace_and_a_faster_newcomer_raises_it(tmp_path: Path) -> None:
    clock = FakeClock()
    service = hub(tmp_path, clock)
    slow = register(service, probe_tokens_per_s=1e6)
    run = service.create_run(
        b"\x01" * 32,
        tiny_run(round={"max_nodes": 10, "deadline_s": 600}, train={"inner_steps": 40}),
    )
    first = service.asks.request_assignment(run.run_id, slow).assignment
    assert first.inner_steps == 40  # alone, it is the fastest
    fast = register(service, probe_tokens_per_s=4e6)  # 4x faster: the cached pace rises at once
    assert service.asks.request_assignment(run.run_id, fast).assignment.inner_steps == 40
    slower = register(service, probe_tokens_per_s=1e6)
    assert service.asks.request_assignment(run.run_id, slower).assignment.inner_steps == 10


def test_heartbeats_cost_no_transaction_and_reach_the_database_in_one_batch(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    service = hub(tmp_path, clock)
    nodes = [register(service) for _ in range(20)]
    clock.t += 5
    assert (
        statements_of(service, lambda: [service.membership.heartbeat(n, "training") for n in nodes])
        == 0
    )
    # one UPDATE for all 20, no run to advance; and (every 5 s) the live count for heartbeat
    # pacing, with the pending runs it may wake
    assert statements_of(service, service.ticker.tick) <= 6
    with service.sessions() as s:
        seen = {n.id: (n.status, n.last_seen_at) for n in s.scalars(select(Node))}
    assert all(seen[n] == ("training", clock.t) for n in nodes)
    clock.t += 1
    service.membership.heartbeat(nodes[0], "idle")
    assert statements_of(service, service.ticker.tick) <= 4  # no count due: as before
    with pytest.raises(HubError) as refused:
        service.membership.heartbeat("0" * 16, "idle")
    assert refused.value.status == 403


def signed_post(client: TestClient, identity: Identity, path: str, body: bytes = b"", **kw):
    return client.post(path, content=body, headers=sign_request(identity, "POST", path, body), **kw)


@pytest.mark.slow  # waits on the wall clock (seconds): the full suite
def test_long_poll_wakes_when_the_round_can_start_and_sleeps_otherwise(tmp_path: Path) -> None:
    service = hub(tmp_path)
    run = service.create_run(
        b"\x01" * 32, tiny_run(round={"min_nodes": 2, "max_nodes": 2, "deadline_s": 60})
    )
    asked = []
    ask = service.asks.assignments_or_wait
    service.asks.assignments_or_wait = lambda *a: asked.append(time.monotonic()) or ask(*a)
    a, b = Identity.generate(), Identity.generate()
    register_body = RegisterRequest(probe_tokens_per_s=1e6, probe_numel=1000).model_dump_json()
    with TestClient(create_app(service)) as client:
        assert signed_post(client, a, f"{API}/nodes/register", register_body.encode()).is_success
        answers: list[dict] = []
        path = f"{API}/runs/{run.run_id}/assignment"
        poll = threading.Thread(
            target=lambda: answers.append(
                signed_post(client, a, path, params={"wait_s": 15}).json()
            )
        )
        poll.start()
        time.sleep(1.0)  # A waits: one node live, two needed
        registered_at = time.monotonic()
        assert signed_post(client, b, f"{API}/nodes/register", register_body.encode()).is_success
        poll.join(timeout=20)
        assert answers and answers[0]["status"] == "assigned"
        assert asked[-1] - registered_at < 3.0, "the long-poll was not woken by the new node"
        # B takes the last place; C finds the round full: its long-poll sleeps until the round
        # changes (asks at start and end)
        assert signed_post(client, b, path, params={"wait_s": 0}).json()["status"] == "assigned"
        c = Identity.generate()
        assert signed_post(client, c, f"{API}/nodes/register", register_body.encode()).is_success
        asked.clear()
        started = time.monotonic()
        again = signed_post(client, c, path, params={"wait_s": 1}).json()
        assert again["status"] == "wait" and time.monotonic() - started >= 0.9
        assert len(asked) <= 2, f"asked {len(asked)} times in one long-poll"  # first and last
        # a non-finite wait answers at once instead of hanging
        assert signed_post(client, a, path, params={"wait_s": "nan"}).status_code in (200, 422)
    assert service.run_status(run.run_id)["rounds"][0]["status"] == "open"


def test_nonces_are_stored_in_shared_commits_and_replays_refused_even_after_restart(
    tmp_path: Path,
) -> None:
    service = hub(tmp_path)
    identity = Identity.generate()
    requests = [sign_request(identity, "POST", "/v1/x", b"{}") for _ in range(40)]
    refused: list[Exception] = []

    def consume(headers: dict[str, str]) -> None:
        try:
            service.authenticate(headers, "POST", "/v1/x", b"{}")
        except HubError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=consume, args=(h,)) for h in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not refused
    with service.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Nonce)) == 40
    with pytest.raises(HubError) as replay:
        service.authenticate(requests[0], "POST", "/v1/x", b"{}")
    assert replay.value.status == 409
    restarted = hub(tmp_path)  # a new process: its memory is empty, the database is not
    with pytest.raises(HubError) as replay:
        restarted.authenticate(requests[1], "POST", "/v1/x", b"{}")
    assert replay.value.status == 409
    restarted.authenticate(sign_request(identity, "POST", "/v1/x", b"{}"), "POST", "/v1/x", b"{}")


@pytest.mark.slow  # waits on the wall clock (seconds): the full suite
def test_a_node_waiting_in_a_long_poll_stays_live(tmp_path: Path) -> None:
    """It asks only when the round changes, yet a wait longer than liveness_s must not make it
    lost (after a hub restart every node waits like this for the next round)."""
    service = build_service(
        f"sqlite:///{tmp_path / 'hub.db'}", tmp_path / "blobs", HubSettings(liveness_s=1.0)
    )
    run = service.create_run(b"\x01" * 32, tiny_run(round={"min_nodes": 2, "deadline_s": 60}))
    a = Identity.generate()
    register_body = RegisterRequest(probe_tokens_per_s=1e6, probe_numel=1000).model_dump_json()
    with TestClient(create_app(service)) as client:
        assert signed_post(client, a, f"{API}/nodes/register", register_body.encode()).is_success
        path = f"{API}/runs/{run.run_id}/assignment"
        poll = threading.Thread(target=lambda: signed_post(client, a, path, params={"wait_s": 3}))
        poll.start()
        time.sleep(2.5)  # mid-wait: asked once, 2.5 liveness periods ago
        ticked_at = time.time()
        service.ticker.tick()  # writes the liveness notes
        with service.sessions() as s:
            seen = s.get(Node, a.node_id).last_seen_at
        poll.join(timeout=10)
    # live when the tick judged it (notes come every liveness_s / 2 while it waits); measured
    # at the tick, not after the poll ends, which is up to wait_s - 2.5 s later
    assert ticked_at - seen <= 1.0, "the waiting node went silent for longer than liveness_s"


def test_fastest_live_node_reads_every_speed_in_one_query_with_the_same_averages(
    tmp_path: Path,
) -> None:
    """Recomputing the fastest live node (under the run's lock) used to send one query per live
    node; now one batched query: the same moving averages (last 5 contributions, oldest first),
    at a cost that does not grow with the number of live nodes."""
    clock = FakeClock()
    service = hub(tmp_path, clock)
    nodes = [register(service) for _ in range(40)]
    run = service.create_run(b"\x01" * 32, tiny_run(round={"max_nodes": 1000}))
    with service.sessions() as s:
        for i, node_id in enumerate(nodes[:30]):
            for rnd in range(i % 8):  # 0..7 contributions: more than the window of 5 for some
                assignment_id = f"{i:04d}{rnd:04d}".ljust(32, "0")
                place = Assignment(
                    id=assignment_id,
                    run_id=run.run_id,
                    round=rnd,
                    attempt=0,
                    node_id=node_id,
                    base_version=rnd,
                    inner_steps=10,
                    created_at=clock.t,
                    deadline_at=clock.t + 60,
                    status="assigned",
                )
                place.status = "submitted"  # rows start assigned (hub/states.py ASSIGNMENT_START)
                s.add(place)
                s.add(
                    Contribution(
                        id=f"{i:04d}{rnd:04d}".ljust(64, "0"),
                        run_id=run.run_id,
                        round=rnd,
                        node_id=node_id,
                        assignment_id=assignment_id,
                        base_version=rnd,
                        codec="int8",
                        bytes_up=1,
                        steps=10,
                        tokens=1000 * (1 + i + 3 * rnd),
                        loss_first=5.0,
                        loss_last=4.0,
                        train_time_s=1.0 + 0.5 * ((i + rnd) % 3),
                        threads=1,
                        created_at=clock.t,
                    )
                )
        s.commit()
    # the moving average of each node's last SPEED_WINDOW contributions, oldest first
    one_by_one: dict[str, float | None] = dict.fromkeys(nodes)
    for i, node_id in enumerate(nodes[:30]):
        for rnd in list(range(i % 8))[-SPEED_WINDOW:]:
            tokens, train_time_s = 1000 * (1 + i + 3 * rnd), 1.0 + 0.5 * ((i + rnd) % 3)
            one_by_one[node_id] = update_speed(one_by_one[node_id], tokens, train_time_s)
    with service.sessions() as s:
        service.asks._achieved.clear()
        cost = statements_of(
            service, lambda: service.asks._load_achieved_speeds(s, run.run_id, nodes + nodes[:3])
        )
        batched = {n: service.asks._achieved[(run.run_id, n)] for n in nodes}
    assert cost == 1
    assert batched == one_by_one
    assert sum(v is None for v in batched.values()) == 10 + 4  # no contribution yet: none
    # the refresh of the fastest live node costs the same for 40 live nodes as for 4
    with service.sessions() as s:
        run_row = s.get(Run, run.run_id)
        service.asks._achieved.clear()
        service.asks._live_view.clear()
        many = statements_of(service, lambda: service.asks._fastest_live(s, run_row, clock.t))
    assert many <= 3, f"{many} statements to find the fastest of {len(nodes)} live nodes"


def test_an_upload_batch_reads_what_all_its_uploads_are_judged_on_once(tmp_path: Path) -> None:
    """Checking an upload before the lock is one statement (the run's state, the node's region
    and the assignment's round; the run's settings and size from memory after its first); a
    batch of uploads reads the run's newest contributions (the energy floor) and the earlier
    contributions with its update digests (the replay check) once each, not once per upload."""
    from tests.hub.test_upload_facts import body

    clock = FakeClock()
    service = hub(tmp_path, clock)
    request = RegisterRequest(probe_tokens_per_s=1e6, probe_numel=1000)
    keys = [Identity.from_seed(f"s{i}".encode()).public_key for i in range(8)]
    nodes = [service.membership.register(key, request) for key in keys]
    settings = tiny_run(round={"max_nodes": 1000, "deadline_s": 60})
    run = service.create_run(b"\x01" * 32, settings)
    work = [a[0].assignment for a in service.asks.assignments_or_wait(run.run_id, nodes)]
    bodies = [body(service, run.run_id, f"s{i}", a, i, 1.0) for i, a in enumerate(work)]
    checked: list = []

    def check(node_id: str, upload: bytes) -> None:
        checked.append(service.uploads.check_upload(run.run_id, node_id, upload))

    costs = [
        statements_of(service, lambda n=n, b=b: check(n, b))
        for n, b in zip(nodes, bodies, strict=True)
    ]
    assert costs[1:] == [1] * 7 and costs[0] <= 2  # (the first reads the run's row)
    engine = service.sessions.kw["bind"]
    seen: list[str] = []

    def note(_conn, _cursor, statement: str, *_args) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", note)
    try:
        answers = service.uploads.store_uploads(run.run_id, checked)
    finally:
        event.remove(engine, "before_cursor_execute", note)
    assert all(a.accepted for a in answers)
    newest = [q for q in seen if "ORDER BY contributions.created_at DESC" in q]
    replays = [q for q in seen if "contributions.update_sha256 IN" in q]
    assert len(newest) == 1 and len(replays) == 1, seen
