"""Node keys are free: the hub's bounds on new identities (invites, per client network, live
never-worked ones) and round places that never-worked keys cannot take from worked nodes. An
in-process hub (real app, SQLite, signatures) with a fake clock; clients at chosen addresses."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from gridswarm.hub import models as m
from gridswarm.hub.errors import HubError
from gridswarm.hub.registration import RegistrationPolicy, client_network
from gridswarm.hub.server import build_service, proxy_options
from gridswarm.hub.service import HubSettings
from gridswarm.hub.store.registration import new_nodes_live, proven_nodes
from gridswarm.identity import Identity, node_id_from_public_key, sign_request
from gridswarm.protocol import API, Assignment, ContributionMeta, Refusal, RegisterRequest
from gridswarm.swarm import free_port
from gridswarm.train.codecs import make_codec
from gridswarm.train.params import pack
from gridswarm.trust.policy import may_select
from gridswarm.trust.reputation import Reputation, selection_weight
from tests.conftest import tiny_run, wait_for
from tests.hub.harness import Hub, hub_cli, meta_fields

REGISTER = f"{API}/nodes/register"
BODY = {"probe_tokens_per_s": 1e5, "probe_numel": 1000}
NO_AUDITS = {"audit_max_rate": 0, "audit_min_rate": 0}  # every unaudited node weighs the same
TOKENS_PER_STEP = 32 * 8  # tiny_run: seq_len x batch_size


def open_hub(root: Path, **policy: object) -> Hub:
    return Hub(root, HubSettings(registration=RegistrationPolicy(**policy)))


def post_from(hub: Hub, address: str, who: Identity, path: str = REGISTER, body: dict = BODY):
    """A signed POST from a client at `address` (the peer address the app sees)."""
    client = TestClient(hub.app, client=(address, 50000), raise_server_exceptions=False)
    data = json.dumps(body).encode()
    return client.post(
        path, content=data, headers=sign_request(who, "POST", path, data, hub.clock())
    )


def refused(response, status: int, reason: Refusal) -> dict:
    assert response.status_code == status, response.text
    assert response.json()["reason"] == reason, response.text
    return response.json()


def nonces(hub: Hub) -> int:
    with hub.service.sessions() as s:
        return s.scalar(select(func.count()).select_from(m.Nonce))


def nodes_from(hub: Hub, network: str) -> int:
    with hub.service.sessions() as s:
        return s.scalar(select(func.count()).where(m.Node.register_net == network))


def test_client_networks():
    assert client_network("198.51.100.7") == "198.51.100.0/24"
    assert client_network("::ffff:198.51.100.200") == "198.51.100.0/24"  # mapped: IPv4
    assert client_network("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_network("testclient") == "host:testclient"
    assert client_network(None) is None


def test_only_invited_keys_register_and_work(tmp_path):
    invited, stranger, early = Identity.generate(), Identity.generate(), Identity.generate()
    Hub(tmp_path).register(early)  # registered while the hub was open
    hub = open_hub(tmp_path, invites=frozenset({invited.public_key.hex()}))
    hub.register(invited)
    hub.register(invited)  # a restart with the same key
    before, before_nonces = hub.snapshot(), nonces(hub)
    body = refused(hub.post(stranger, REGISTER, BODY), 403, Refusal.NOT_INVITED)
    assert stranger.public_key.hex() in body["detail"]
    assert hub.snapshot() == before and nonces(hub) == before_nonces  # nothing stored
    refused(hub.post(early, REGISTER, BODY), 403, Refusal.NOT_INVITED)  # taken off: not again
    run_id = hub.create_run(Identity.generate(), tiny_run())
    r = hub.post(early, f"{API}/runs/{run_id}/assignment", params={"wait_s": 0})
    refused(r, 403, Refusal.NOT_INVITED)  # nor does its old registration get it work
    assert hub.assignment(invited, run_id) is not None


def test_new_identities_per_network_per_hour(tmp_path):
    hub = open_hub(tmp_path, per_network_per_hour=3)
    first = [Identity.generate() for _ in range(3)]
    for i, who in enumerate(first):
        assert post_from(hub, f"198.51.100.{i + 1}", who).status_code == 200
        hub.clock.advance(60)
    before, before_nonces = hub.snapshot(), nonces(hub)
    for address in ("198.51.100.250", "::ffff:198.51.100.9"):  # the same /24
        r = post_from(hub, address, Identity.generate())
        body = refused(r, 429, Refusal.REGISTRATION_LIMITED)
        assert "198.51.100.0/24" in body["detail"]
        assert int(r.headers["retry-after"]) == 3600 - 180  # when the oldest of the 3 ages out
    assert hub.snapshot() == before and nonces(hub) == before_nonces  # nothing stored
    for who in first:  # known keys re-register from anywhere in the network, or elsewhere
        assert post_from(hub, "198.51.100.77", who).status_code == 200
    assert post_from(hub, "198.51.101.1", Identity.generate()).status_code == 200  # another /24
    for i in range(2):  # IPv6: per /64
        assert post_from(hub, f"2001:db8:0:7::{i + 1}", Identity.generate()).status_code == 200
    assert post_from(hub, "2001:db8:0:8::1", Identity.generate()).status_code == 200
    hub.clock.advance(3600 - 180)
    assert post_from(hub, "198.51.100.250", Identity.generate()).status_code == 200
    assert nodes_from(hub, "198.51.100.0/24") == 4


def test_a_flood_of_500_from_one_network_is_cut_at_k(tmp_path):
    k = 32
    hub = open_hub(tmp_path, per_network_per_hour=k)
    statuses = [post_from(hub, "203.0.113.9", Identity.generate()).status_code for _ in range(500)]
    assert statuses.count(200) == k and statuses.count(429) == 500 - k
    assert statuses[:k] == [200] * k
    assert nodes_from(hub, "203.0.113.0/24") == k
    # the hub still answers everyone else
    other = Identity.generate()
    assert post_from(hub, "192.0.2.1", other).status_code == 200
    assert post_from(hub, "192.0.2.1", other, f"{API}/nodes/heartbeat", {}).status_code == 200
    run_id = hub.create_run(Identity.generate(), tiny_run())
    assert hub.assignment(other, run_id) is not None


def contribution(a: Assignment, numel: int) -> bytes:
    """A small random update of its own for assignment `a` (two are never the same)."""
    seed = int(a.id[:8], 16)
    update = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 1e-3
    meta = ContributionMeta(**meta_fields(a, TOKENS_PER_STEP)).model_dump()
    return pack(make_codec("int8").encode(update), meta)


def work_one_round(hub: Hub, run_id: str, nodes: list[Identity]) -> None:
    """`nodes` each take a place, train and upload; the round closes."""
    assignments = [hub.assignment(who, run_id) for who in nodes]
    assert all(a is not None for a in assignments), assignments
    for who, a in zip(nodes, assignments, strict=True):
        body = contribution(a, hub.numel(run_id))
        r = hub.post(who, f"{API}/runs/{run_id}/contributions", body)
        assert r.status_code == 200, r.text
    version = hub.run_row(run_id).version
    hub.service.ticker.tick()
    assert hub.run_row(run_id).version == version + 1


def test_live_never_worked_identities_are_capped(tmp_path):
    hub = open_hub(tmp_path, max_new_nodes=3)
    worker = Identity.generate()
    hub.register(worker)
    run_id = hub.create_run(Identity.generate(), tiny_run(trust=dict(NO_AUDITS)))
    work_one_round(hub, run_id, [worker])  # it has worked: it does not count
    new = [Identity.generate() for _ in range(2)]
    for who in new:
        hub.register(who)
    r = hub.post(Identity.generate(), REGISTER, BODY)
    assert r.status_code == 200, r.text  # 3rd new identity: within the cap
    before, before_nonces = hub.snapshot(), nonces(hub)
    r = hub.post(Identity.generate(), REGISTER, BODY)
    body = refused(r, 429, Refusal.REGISTRATION_LIMITED)
    assert "3 live node identities have not worked" in body["detail"]
    assert int(r.headers["retry-after"]) == 20  # liveness_s: when silent ones stop counting
    assert hub.snapshot() == before and nonces(hub) == before_nonces
    hub.register(new[0])  # a known key: never refused
    hub.clock.advance(21)  # the new identities fall silent
    hub.register(Identity.generate())


def test_never_worked_keys_cannot_take_places_from_worked_nodes(tmp_path):
    hub = open_hub(tmp_path)
    honest = [Identity.generate() for _ in range(2)]
    for who in honest:
        hub.register(who)
    rounds = {"deadline_s": 30, "quorum": 2, "min_nodes": 1, "max_nodes": 2}
    cfg = tiny_run(trust=dict(NO_AUDITS), round=rounds, budget={"rounds": 10})
    run_id = hub.create_run(Identity.generate(), cfg)
    work_one_round(hub, run_id, honest)
    sybils = [Identity.generate() for _ in range(20)]
    for who in sybils:
        hub.register(who)
    # round 1 is pending: the sybils ask first, but the worked nodes waiting get the places
    assert all(hub.assignment(who, run_id) is None for who in sybils)
    assert hub.assignment(honest[0], run_id) is not None  # opens the round
    assert all(hub.assignment(who, run_id) is None for who in sybils)  # 1 place, 1 worked node
    work_one_round(hub, run_id, honest)  # honest[0] again, and honest[1] takes the last place
    # a round pending for longer than the grace: a never-worked node may open it (a run never
    # waits for worked nodes that are busy elsewhere), but the last place is a worked node's
    hub.clock.advance(16)
    for who in [*honest, *sybils]:
        assert hub.post(who, f"{API}/nodes/heartbeat", {}).status_code == 200
    hub.service.ticker.tick()  # writes the heartbeats
    assert hub.assignment(sybils[0], run_id) is not None
    assert all(hub.assignment(who, run_id) is None for who in sybils[1:])
    assert hub.assignment(honest[1], run_id) is not None


def test_registration_refusals_are_in_the_openapi_document(tmp_path):
    doc = Hub(tmp_path).get("/openapi.json").json()
    reasons = doc["components"]["schemas"]["Refusal"]["enum"]
    assert {"not_invited", "registration_limited"} <= set(reasons)
    responses = doc["paths"][REGISTER]["post"]["responses"]
    assert "invited" in responses["403"]["description"]
    assert "registration" in responses["429"]["description"]


@pytest.mark.parametrize("address", ["", "not an address", "999.1.1.1"])
def test_odd_peer_addresses(tmp_path, address):
    hub = open_hub(tmp_path, per_network_per_hour=1)
    assert post_from(hub, address, Identity.generate()).status_code == 200
    r = post_from(hub, address, Identity.generate())
    assert r.status_code == (200 if address == "" else 429), r.text


def test_worked_nodes_rank_before_never_worked_ones():
    low = Reputation(consecutive_valid=1, audits_passed=1, liveness=0.5, score=0.05)
    newcomer, cheater = Reputation(), Reputation(strikes=1)
    assert selection_weight(low) < selection_weight(newcomer)  # the floor is above its score
    assert may_select(low, [newcomer] * 5, 1, worked=True, competitors_worked=[False] * 5) is None
    reason = may_select(newcomer, [low], 1, worked=False, competitors_worked=[True])
    assert "have worked on this hub" in reason
    assert may_select(newcomer, [newcomer] * 3, 1, False, [False] * 3) is None  # ties: no rank
    assert may_select(newcomer, [cheater] * 3, 1, False, [True] * 3) is None  # excluded: none
    assert may_select(newcomer, [low], 2, False, [True]) is None  # a place for each


# ---------------------------------------------------------------- the operator's side


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.output
    return errors[0]


def test_hub_flags(tmp_path, monkeypatch):
    result, served = hub_cli(monkeypatch)
    assert result.exit_code == 0, result.output
    (args, kwargs) = served[0]
    assert args[4].registration == RegistrationPolicy(None, 32, 1000)  # an open hub's defaults
    assert kwargs["forwarded_allow_ips"] is None
    key = Identity.generate().public_key.hex()
    invites = tmp_path / "nodes.txt"
    invites.write_text(f"# the lab\n{key.upper()}  # box 1\n\n")
    result, served = hub_cli(
        monkeypatch,
        *("--node-invites", str(invites), "--register-per-net-hour", "5"),
        *("--max-new-nodes", "0", "--forwarded-allow-ips", "10.0.0.1,10.0.0.2"),
    )
    assert result.exit_code == 0, result.output
    (args, kwargs) = served[0]
    assert args[4].registration == RegistrationPolicy(frozenset({key}), 5, 0)
    assert kwargs["forwarded_allow_ips"] == "10.0.0.1,10.0.0.2"
    invites.write_text(f"{key}\nnot-a-key\n")
    line = one_error_line(hub_cli(monkeypatch, "--node-invites", str(invites))[0])
    assert f"{invites}:2: not a public key" in line
    invites.write_text("# nobody\n")
    assert "no node keys" in one_error_line(hub_cli(monkeypatch, "--node-invites", str(invites))[0])
    missing = one_error_line(hub_cli(monkeypatch, "--node-invites", str(tmp_path / "nope"))[0])
    assert "nope" in missing


@pytest.mark.parametrize(
    "forwarded, network", [(None, "127.0.0.0/24"), ("127.0.0.1", "203.0.113.0/24")]
)
def test_x_forwarded_for_is_believed_only_from_listed_proxies(tmp_path, forwarded, network):
    hub = open_hub(tmp_path, per_network_per_hour=1)
    config = uvicorn.Config(
        hub.app, host="127.0.0.1", port=free_port(), log_level="warning", **proxy_options(forwarded)
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: srv.started, 30, "the hub to listen")
        url = f"http://127.0.0.1:{config.port}{REGISTER}"
        data = json.dumps(BODY).encode()
        for i, expected in enumerate((200, 200 if forwarded else 429)):
            who = Identity.generate()
            headers = sign_request(who, "POST", REGISTER, data, hub.clock())
            headers["x-forwarded-for"] = f"203.0.{113 + i}.5"  # two networks, if believed
            r = httpx.post(url, content=data, headers=headers, timeout=30)
            assert r.status_code == expected, r.text
        assert nodes_from(hub, network) == 1
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.mark.slow  # a PostgreSQL server: the full suite
@pytest.mark.postgres
def test_bounds_on_postgresql(pg_database, tmp_path):
    policy = RegistrationPolicy(per_network_per_hour=2, max_new_nodes=3)
    service = build_service(pg_database, tmp_path / "blobs", HubSettings(registration=policy))
    req = RegisterRequest(probe_tokens_per_s=1e5, probe_numel=1000)
    keys = [Identity.generate().public_key for _ in range(4)]
    for key in keys[:2]:
        service.membership.register(key, req, "198.51.100.1")
    with pytest.raises(HubError) as refused_net:
        service.membership.registration.precheck(keys[2], "198.51.100.2")
    assert refused_net.value.reason == Refusal.REGISTRATION_LIMITED
    service.membership.register(keys[0], req, "198.51.100.3")  # known: never refused
    service.membership.register(keys[2], req, "2001:db8::1")
    with pytest.raises(HubError) as refused_cap:
        service.membership.register(keys[3], req, "192.0.2.1")
    assert "3 live node identities" in refused_cap.value.detail
    with service.sessions() as s:
        assert new_nodes_live(s, 0.0) == 3
        assert proven_nodes(s, [node_id_from_public_key(k) for k in keys]) == set()
        assert s.scalar(select(func.count()).select_from(m.Node)) == 3
