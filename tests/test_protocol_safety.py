"""Bad requests against a real hub process: each gets a clear 4xx and changes nothing."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest
import torch

from gridswarm.identity import Identity, sign_request
from gridswarm.node.client import HubClient
from gridswarm.protocol import API, ContributionMeta, RegisterRequest
from gridswarm.swarm import Swarm, free_port
from gridswarm.train.codecs import make_codec
from gridswarm.train.params import pack
from tests.conftest import tiny_run
from tests.hub.harness import meta_fields

pytestmark = pytest.mark.slow
REGISTER = f"{API}/nodes/register"
GOOD_REGISTRATION = RegisterRequest(probe_tokens_per_s=1e4, probe_numel=1000).model_dump_json()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    swarm = Swarm(tmp_path_factory.mktemp("hub"), free_port())
    swarm.start_hub()
    sponsor = HubClient(swarm.url, Identity.generate())
    # the uploads here are made up, not trained: no replay audit, so a round cannot be re-planned
    # under a test that expects its assignment still open (audits have tests of their own)
    config = tiny_run(
        round={"deadline_s": 600, "quorum": 1}, trust={"audit_max_rate": 0, "audit_min_rate": 0}
    )
    run_id = sponsor.create_run(config).run_id
    yield swarm, run_id
    swarm.stop()


@pytest.fixture
def node(hub) -> tuple[HubClient, Identity]:
    swarm, _ = hub
    ident = Identity.generate()
    client = HubClient(swarm.url, ident, retry_for_s=5)
    client.register(RegisterRequest(probe_tokens_per_s=1e5, probe_numel=1000))
    return client, ident


def post(url: str, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(url + path, content=body, headers=headers, timeout=10)


def snapshot(hub) -> str:
    swarm, run_id = hub
    status = httpx.get(f"{swarm.url}{API}/runs/{run_id}").json()
    status.pop("live_nodes")
    for node in status["nodes"]:
        node.pop("state")  # live / silent: a view of the clock, not stored state
    return json.dumps(status, sort_keys=True)


def contribution(assignment, numel: int, nan_scale: bool = False, **meta) -> bytes:
    # a small update of its own per assignment: the same bytes twice would be a replayed update
    seed = int(assignment.id[:8], 16)
    update = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 1e-3
    tensors = make_codec("int8").encode(update)
    if nan_scale:
        tensors["scale"][0] = float("nan")
    fields = meta_fields(assignment, 32 * 8, **meta)
    return pack(tensors, ContributionMeta(**fields).model_dump())


def test_unsigned_request_is_refused(hub):
    before = snapshot(hub)
    r = post(hub[0].url, REGISTER, GOOD_REGISTRATION.encode(), {})
    assert r.status_code == 401 and "unsigned" in r.json()["detail"]
    assert snapshot(hub) == before


def test_stale_request_is_refused(hub):
    ident = Identity.generate()
    body = GOOD_REGISTRATION.encode()
    r = post(
        hub[0].url, REGISTER, body, sign_request(ident, "POST", REGISTER, body, time.time() - 600)
    )
    assert r.status_code == 401 and "stale" in r.json()["detail"]


def test_replayed_request_is_refused(hub):
    ident = Identity.generate()
    body = GOOD_REGISTRATION.encode()
    headers = sign_request(ident, "POST", REGISTER, body)
    assert post(hub[0].url, REGISTER, body, headers).status_code == 200
    r = post(hub[0].url, REGISTER, body, headers)
    assert r.status_code == 409 and "replayed" in r.json()["detail"]


def test_forged_signature_is_refused(hub):
    victim, forger = Identity.generate(), Identity.generate()
    body = GOOD_REGISTRATION.encode()
    headers = sign_request(forger, "POST", REGISTER, body)
    headers["x-gridswarm-key"] = victim.public_key.hex()
    r = post(hub[0].url, REGISTER, body, headers)
    assert r.status_code == 401 and "bad signature" in r.json()["detail"]


def test_tampered_body_is_refused(hub):
    ident = Identity.generate()
    body = GOOD_REGISTRATION.encode()
    headers = sign_request(ident, "POST", REGISTER, body)
    r = post(hub[0].url, REGISTER, body.replace(b"10000", b"99999"), headers)
    assert r.status_code == 401


def test_oversized_request_is_refused_before_reading(hub):
    ident = Identity.generate()
    body = b"x" * (65 * 1024)
    r = post(hub[0].url, REGISTER, body, sign_request(ident, "POST", REGISTER, body))
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"probe_tokens_per_s": -1, "probe_numel": 5}',
        b'{"probe_tokens_per_s": 1, "probe_numel": 5, "evil": 1}',
    ],
)
def test_malformed_request_names_the_problem(hub, body):
    ident = Identity.generate()
    r = post(hub[0].url, REGISTER, body, sign_request(ident, "POST", REGISTER, body))
    assert r.status_code == 422 and "malformed" in r.json()["detail"]


def test_unregistered_node_gets_no_work(hub):
    swarm, run_id = hub
    client = HubClient(swarm.url, Identity.generate(), retry_for_s=5)
    with pytest.raises(Exception, match="not registered"):
        client.assignment(run_id, wait_s=0)


def test_bad_contributions_are_refused_and_change_nothing(hub, node):
    swarm, run_id = hub
    client, _ = node
    a = client.assignment(run_id, wait_s=5).assignment
    numel = httpx.get(f"{swarm.url}{API}/runs/{run_id}").json()["numel"]
    before = snapshot(hub)
    bad = {
        "garbage bytes": (b"\x00" * 100, 400, "malformed contribution"),
        "wrong size": (contribution(a, numel - 256), 400, "does not match"),
        "NaN values": (contribution(a, numel, nan_scale=True), 400, "non-finite"),
        "more tokens than steps": (contribution(a, numel, tokens=10**9), 400, "tokens"),
        "wrong step count": (contribution(a, numel, steps=a.inner_steps + 1), 400, "steps"),
        "wrong codec": (contribution(a, numel, codec="fp16"), 400, "codec"),
        "unknown assignment": (contribution(a, numel, assignment_id="f" * 32), 404, "not found"),
    }
    for name, (body, status, message) in bad.items():
        path = f"{API}/runs/{run_id}/contributions"
        r = client.http.post(
            path, content=body, headers=sign_request(client.identity, "POST", path, body)
        )
        assert r.status_code == status, name
        assert message in r.json()["detail"], name
    assert snapshot(hub) == before
    other = HubClient(swarm.url, Identity.generate(), retry_for_s=5)
    other.register(RegisterRequest(probe_tokens_per_s=1e5, probe_numel=1000))
    with pytest.raises(Exception, match="another node"):
        other.contribute(run_id, contribution(a, numel))
    ack = client.contribute(run_id, contribution(a, numel))  # the real one still goes through
    assert ack.accepted
    with pytest.raises(Exception, match="duplicate"):
        client.contribute(run_id, contribution(a, numel, loss_last=3.0))


def test_node_dying_mid_upload_stores_nothing(hub, node):
    swarm, run_id = hub
    client, ident = node
    answer = client.assignment(run_id, wait_s=5)
    assert answer.status == "assigned"
    numel = httpx.get(f"{swarm.url}{API}/runs/{run_id}").json()["numel"]
    body = contribution(answer.assignment, numel)
    path = f"{API}/runs/{run_id}/contributions"
    headers = sign_request(ident, "POST", path, body)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", swarm.port)) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n{head}\r\n".encode()
            + body[: len(body) // 2]
        )
    time.sleep(0.5)
    status = httpx.get(f"{swarm.url}{API}/runs/{run_id}").json()
    assert all(n["contributions"] == 0 for n in status["nodes"] if n["id"] == ident.node_id)
    assert client.contribute(run_id, body).accepted  # the retry after the crash is accepted


def test_blob_reads(hub):
    swarm, _ = hub
    assert httpx.get(f"{swarm.url}{API}/blobs/nothex").status_code == 422  # not a sha256
    assert httpx.get(f"{swarm.url}{API}/blobs/{'a' * 64}").status_code == 404


def test_invalid_run_settings_are_refused(hub):
    swarm, _ = hub
    sponsor = HubClient(swarm.url, Identity.generate(), retry_for_s=5)
    with pytest.raises(Exception, match=r"train\.inner_lr"):
        sponsor.create_run(tiny_run(train={"inner_lr": -1}))
    with pytest.raises(Exception, match="aggregator"):
        sponsor.create_run(tiny_run(round={"aggregator": "nonsense"}))


def test_contribution_blobs_are_never_served(hub, node):
    swarm, run_id = hub
    client, _ = node
    answer = client.assignment(run_id, wait_s=5)
    if answer.status == "assigned":  # make sure at least one contribution is stored
        numel = httpx.get(f"{swarm.url}{API}/runs/{run_id}").json()["numel"]
        assert client.contribute(run_id, contribution(answer.assignment, numel)).accepted
    for _ in range(20):  # a round may close while we look: retry until the version holds still
        version = httpx.get(f"{swarm.url}{API}/runs/{run_id}").json()["version"]
        blobs = list(Path(swarm.workdir, "blobs").rglob("*"))
        served = [
            p
            for p in blobs
            if p.is_file() and httpx.get(f"{swarm.url}{API}/blobs/{p.name}").status_code == 200
        ]
        if httpx.get(f"{swarm.url}{API}/runs/{run_id}").json()["version"] == version:
            break
    # weights of every version and the deltas between them; no contribution, momentum or residual
    assert len(served) == 1 + 2 * version
    assert len([p for p in blobs if p.is_file()]) > len(served)
