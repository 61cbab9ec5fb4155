"""Heartbeat pacing (hub/pacing.py): the hub tells nodes an interval that grows with the live
nodes, counts every signed request as a sign of life, and stretches liveness with the longest
interval it told; the node (node/client.py) beats only when that long has passed without an
answer. In-process hub on a temporary SQLite, the node's real `HubClient` on the real app."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from gridswarm.hub.app import create_app
from gridswarm.hub.models import Node
from gridswarm.hub.pacing import (
    BUCKET_S,
    HEARTBEAT_MAX_S,
    HEARTBEAT_MIN_S,
    HeartbeatPacing,
    heartbeat_interval_s,
    liveness_for,
)
from gridswarm.hub.server import build_service
from gridswarm.identity import Identity, sign_request
from gridswarm.node.client import HubClient
from gridswarm.protocol import (
    API,
    DEFAULT_HEARTBEAT_S,
    MAX_LONG_POLL_S,
    HeartbeatResponse,
    NodeStatus,
    RegisterRequest,
    RegisterResponse,
)
from tests.conftest import tiny_run


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_interval_grows_with_the_live_nodes_within_its_bounds() -> None:
    assert heartbeat_interval_s(0, 100) == HEARTBEAT_MIN_S == DEFAULT_HEARTBEAT_S
    assert heartbeat_interval_s(300, 100) == HEARTBEAT_MIN_S  # a small swarm: as before
    assert heartbeat_interval_s(1_000, 100) == 10.0
    assert heartbeat_interval_s(10_000, 100) == HEARTBEAT_MAX_S == 60.0
    assert heartbeat_interval_s(10**9, 100) == HEARTBEAT_MAX_S
    for budget in (0.0, -1.0, float("nan"), float("inf")):  # off, or nonsense: the minimum
        assert heartbeat_interval_s(10_000, budget) in (HEARTBEAT_MIN_S, HEARTBEAT_MAX_S)
    assert heartbeat_interval_s(10_000, 0.0) == HEARTBEAT_MIN_S
    # liveness: the operator's at the minimum interval, else at least 3 intervals
    assert liveness_for(HEARTBEAT_MIN_S, 8.0) == 8.0
    assert liveness_for(5.0, 20.0) == 20.0
    assert liveness_for(10.0, 20.0) == 30.0
    assert liveness_for(60.0, 20.0) == 180.0


def test_liveness_keeps_the_longest_interval_told_until_every_node_has_heard_a_newer_one() -> None:
    pacing = HeartbeatPacing(base_liveness_s=20.0, budget_per_s=100.0)
    t = 1_000_000.0
    assert pacing.advertise(t) == HEARTBEAT_MIN_S and pacing.liveness_s(t) == 20.0
    pacing.set_live(6_000, t)
    assert pacing.advertise(t) == 60.0
    assert pacing.liveness_s(t) == 180.0
    pacing.set_live(100, t + 5)  # the swarm shrank: new answers say 3 s ...
    assert pacing.advertise(t + 5) == HEARTBEAT_MIN_S
    # ... but nodes told 60 s may stay silent that long: not lost before 3 x 60 s
    assert pacing.liveness_s(t + 60) == 180.0
    later = t + pacing.hold_s + 2 * BUCKET_S  # every node has beaten since and heard 3 s
    assert pacing.liveness_s(later) == 20.0
    assert not pacing.count_due(t + 5) and pacing.count_due(t + 5 + 60)


def test_any_signed_request_of_a_node_is_a_sign_of_life(tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    service = build_service(f"sqlite:///{tmp_path / 'hub.db'}", tmp_path / "blobs")
    service.clock = service.trust.clock = clock
    identity = Identity.generate()
    node_id = service.membership.register(
        identity.public_key, RegisterRequest(probe_tokens_per_s=1e6, probe_numel=1000)
    )
    registered_at = clock.t
    clock.t += 15.0  # within the signature's clock skew
    path = f"{API}/blobs/{'0' * 64}"
    service.authenticate(sign_request(identity, "GET", path, b""), "GET", path, b"")
    service.ticker.tick()  # the notes are written in a batch
    with service.sessions() as s:
        node = s.get(Node, node_id)
        assert node.last_seen_at == clock.t > registered_at
        assert node.status == NodeStatus.IDLE  # a sign of life does not change the status
    # a heartbeat and a later request in one batch: the later time, the heartbeat's status
    clock.t += 1.0
    service.membership.heartbeat(node_id, NodeStatus.TRAINING)
    clock.t += 1.0
    service.authenticate(sign_request(identity, "GET", path, b""), "GET", path, b"")
    service.ticker.tick()
    with service.sessions() as s:
        node = s.get(Node, node_id)
        assert (node.status, node.last_seen_at) == (NodeStatus.TRAINING, clock.t)
    # a sponsor's key (not a node) is noted nowhere
    sponsor = Identity.generate()
    service.authenticate(sign_request(sponsor, "GET", path, b""), "GET", path, b"")
    assert not service.membership._seen


def test_the_hub_tells_the_interval_and_the_node_client_obeys_it(tmp_path: Path) -> None:
    service = build_service(f"sqlite:///{tmp_path / 'hub.db'}", tmp_path / "blobs")
    run = service.create_run(b"\x01" * 32, tiny_run(round={"min_nodes": 5}))
    with TestClient(create_app(service)) as http:
        client = HubClient("http://testserver", Identity.generate(), retry_for_s=5.0)
        client.clients, client.http = [http], http  # the node's client on the real app
        assert client.heartbeat_s is None  # until told: a beat every 3 s, whatever else
        client.register(RegisterRequest(probe_tokens_per_s=1e6, probe_numel=1000))
        assert client.heartbeat_s == HEARTBEAT_MIN_S  # one live node: the minimum
        service.membership.pacing.set_live(2_000, service.clock())  # as the ticker would count
        client.heartbeat(NodeStatus.IDLE)
        assert client.heartbeat_s == 20.0
        assert service.run_status(run.run_id)["liveness_s"] == 60.0  # 3 intervals
        assert 19.0 < client.heartbeat_due_in_s() <= 20.0
        # no answer for 15 s: due in 5; any signed request answered resets it
        client.last_answer_at = client.last_beat_at = time.monotonic() - 15.0
        assert 4.0 < client.heartbeat_due_in_s() <= 5.0
        assert client.assignment(run.run_id, wait_s=0).status == "wait"
        assert 19.0 < client.heartbeat_due_in_s() <= 20.0
        # a hub that is down: the next try waits a whole interval after the last one tried
        client.last_answer_at = time.monotonic() - 100.0
        client.last_beat_at = time.monotonic()
        assert client.heartbeat_due_in_s() > 19.0
        # a waiting node long-polls as long as it is told to beat (never shorter than it
        # asked, never longer than the hub takes): the asks are paced like the heartbeats
        assert client.long_poll_s(10.0) == 20.0
        assert client.long_poll_s(30.0) == 30.0
        service.membership.pacing.set_live(1_000_000, service.clock())
        client.heartbeat(NodeStatus.IDLE)
        assert client.long_poll_s(10.0) == MAX_LONG_POLL_S == HEARTBEAT_MAX_S
        r = http.post(
            f"{API}/runs/{run.run_id}/assignment",
            params={"wait_s": MAX_LONG_POLL_S + 1},
            headers=sign_request(
                client.identity, "POST", f"{API}/runs/{run.run_id}/assignment", b""
            ),
        )
        assert r.status_code == 422  # the hub takes no longer long-poll


def test_interval_answers_are_bounded() -> None:
    assert HeartbeatResponse.model_validate_json(b'{"ok": true}').heartbeat_s is None  # old hub
    for bad in (0, 0.5, -3, 601, 1e308):
        with pytest.raises(ValidationError):
            HeartbeatResponse.model_validate({"heartbeat_s": bad})
        with pytest.raises(ValidationError):
            RegisterResponse.model_validate({"node_id": "ab" * 8, "heartbeat_s": bad})
    with pytest.raises(ValidationError):
        HeartbeatResponse.model_validate_json(b'{"heartbeat_s": NaN}')


@pytest.mark.slow  # waits for the ticker's live count on the wall clock (up to 5 s)
def test_a_long_poll_waiting_for_live_nodes_wakes_when_a_silent_node_beats_again(
    tmp_path: Path,
) -> None:
    """No timer: the ticker's live count (every COUNT_EVERY_S) wakes it, and a long-poll
    that nothing woke answers at its end without asking again."""
    service = build_service(f"sqlite:///{tmp_path / 'hub.db'}", tmp_path / "blobs")
    run = service.create_run(b"\x01" * 32, tiny_run(round={"min_nodes": 2, "max_nodes": 2}))
    asked = []
    ask = service.asks.assignments_or_wait
    service.asks.assignments_or_wait = lambda *a: asked.append(time.monotonic()) or ask(*a)
    a, b = Identity.generate(), Identity.generate()
    body = RegisterRequest(probe_tokens_per_s=1e6, probe_numel=1000).model_dump_json().encode()
    path = f"{API}/runs/{run.run_id}/assignment"

    def post(identity: Identity, url: str, content: bytes = b"", **kw):
        return http.post(
            url, content=content, headers=sign_request(identity, "POST", url, content), **kw
        )

    with TestClient(create_app(service)) as http:
        assert post(a, f"{API}/nodes/register", body).is_success
        b_id = post(b, f"{API}/nodes/register", body).json()["node_id"]
        with service.sessions() as s:  # B fell silent long ago
            s.get(Node, b_id).last_seen_at = time.time() - 3600
            s.commit()
        service.membership.pacing.set_live(1, time.time())  # what the ticker counted meanwhile
        started = time.monotonic()
        assert post(a, path, params={"wait_s": 1}).json()["status"] == "wait"
        assert len(asked) == 1, "a long-poll nothing woke asked again"
        assert time.monotonic() - started >= 0.9
        asked.clear()
        answers: list[dict] = []
        poll = threading.Thread(
            target=lambda: answers.append(post(a, path, params={"wait_s": 20}).json())
        )
        poll.start()
        time.sleep(0.5)
        service.membership.heartbeat(
            b_id, NodeStatus.IDLE
        )  # B is back: no request signals the round
        poll.join(timeout=30)
        assert answers and answers[0]["status"] == "assigned"
        assert asked[-1] - asked[0] < 9.0  # woken by the count (<= 5 s): no 10 s timer, no wait end
        assert len(asked) == 2
