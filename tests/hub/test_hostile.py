"""Hostile but correctly signed input cannot stop the hub: one regression test per case of
issue 9 (each was a 500, a hang, a hub killed for memory or a stopped run), on an in-process hub
with a fake clock and real signatures."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from gridswarm.hub import models as m
from gridswarm.hub.limits import MAX_RATE_PROCESSES, MAX_REPLICA_COUNT, RateLimiter, replica_share
from gridswarm.hub.server import MAX_WORKERS
from gridswarm.hub.service import HubSettings
from gridswarm.identity import Identity
from gridswarm.ledger.ops import fund_claim
from gridswarm.protocol import API, Refusal
from gridswarm.train.codecs import make_codec
from gridswarm.train.params import pack
from tests.conftest import tiny_run
from tests.hub.harness import Hub, contribution, meta_fields

NO_AUDITS = {"audit_max_rate": 0, "audit_min_rate": 0}
TOKENS_PER_STEP = 32 * 8  # tiny_run: seq_len x batch_size


def run_config(**overrides) -> dict:
    return tiny_run(trust=dict(NO_AUDITS), **overrides)


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    return Hub(tmp_path)


def rss_mib() -> float:
    """This process's resident memory now (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def refused(response, status: int, reason: Refusal) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["reason"] == reason, body
    return body


# ---------------------------------------------------------------- run settings


@pytest.mark.parametrize(
    "section, field, value",
    [
        ("model", "n_layer", 10**30),
        ("train", "batch_size", 2**31),
        ("trust", "safety_factor", float("inf")),  # 1e999 in JSON
        ("energy", "deadline_s", float("inf")),
        ("train", "outer_lr", float("inf")),
        ("train", "outer_lr", float("nan")),
        ("data", "dataset", "x" * 60_000),
        ("name", None, "\ud800"),
    ],
)
def test_unbounded_run_settings_are_refused(hub, section, field, value):
    cfg = run_config()
    if field is None:
        cfg[section] = value
    else:
        cfg.setdefault(section, {})[field] = value
    before = hub.snapshot()
    body = json.dumps({"config": cfg}).replace("Infinity", "1e999")
    r = hub.post(Identity.generate(), f"{API}/runs", body)
    assert r.status_code == 422, r.text
    if r.json()["reason"] == Refusal.INVALID_CONFIG:
        assert section in r.json()["detail"]
    else:  # a lone surrogate does not even parse as JSON
        assert r.json()["reason"] == Refusal.MALFORMED
    assert hub.snapshot() == before


@pytest.mark.parametrize(
    "dataset",
    ["/etc/hostname", "/etc", "~", "..", "/nonexistent/secret.txt", "notes/../../etc/passwd"],
)
def test_a_run_may_not_make_the_hub_read_its_files(tmp_path, dataset):
    """`data.dataset` is the sponsor's, who on an open hub is anyone: a path is read only under
    the hub operator's `--data-root`, and a refusal stores nothing."""
    root = tmp_path / "datasets"
    root.mkdir()
    hub = Hub(tmp_path, HubSettings(data_roots=(root,)))
    before = hub.snapshot()
    r = hub.post(
        Identity.generate(), f"{API}/runs", {"config": run_config(data={"dataset": dataset})}
    )
    body = refused(r, 422, Refusal.INVALID_CONFIG)
    assert "--data-root" in body["detail"] and str(root) in body["detail"]
    assert hub.snapshot() == before
    # under the root a path is taken; bundled names and manifests never name a file
    (root / "corpus.txt").write_text("to be or not to be " * 3000)
    for ok in (str(root / "corpus.txt"), str(root), "tinyshakespeare"):
        r = hub.post(
            Identity.generate(), f"{API}/runs", {"config": run_config(data={"dataset": ok})}
        )
        assert r.status_code == 200, r.text
    # a symlink inside the root that leads out of it is a path outside it
    (root / "escape").symlink_to("/etc")
    r = hub.post(
        Identity.generate(),
        f"{API}/runs",
        {"config": run_config(data={"dataset": str(root / "escape")})},
    )
    refused(r, 422, Refusal.INVALID_CONFIG)


def test_a_node_reads_no_file_a_run_names_outside_its_data_roots(tmp_path):
    """The node's side of the same rule: the run's config comes from the hub, which relays a
    sponsor's; the node refuses to train on a path it was not told to share (reported to the
    hub as a failure, like a missing dataset), and trains on one under its `--data-root`."""
    from gridswarm.node.agent import NodeAgent, NodeOptions
    from gridswarm.train.dataset import DatasetError

    secret = tmp_path / "private" / "diary.txt"
    secret.parent.mkdir()
    secret.write_text("nobody's business " * 2000)
    config = run_config(data={"dataset": str(secret)})
    agent = NodeAgent(NodeOptions(hub_url="http://127.0.0.1:9", home=tmp_path / "node"))
    with pytest.raises(DatasetError, match="this node reads paths only under its --data-root"):
        agent.workload("r1", config)
    opened = NodeAgent(
        NodeOptions(
            hub_url="http://127.0.0.1:9", home=tmp_path / "node2", data_roots=(secret.parent,)
        )
    )
    assert opened.workload("r1", config).numel > 0
    assert agent.workload("r2", run_config()).numel > 0  # bundled: no file named


@pytest.mark.parametrize(
    "overrides",
    [
        {"model": {"n_layer": 1024, "n_head": 64, "n_embd": 65536}},
        {"train": {"seq_len": 32, "batch_size": 2**20, "inner_steps": 20, "min_inner_steps": 2}},
        {
            "model": {
                "kind": "hf",
                "architecture": "llama",
                "hf_config": {"num_hidden_layers": 10**6},
            }
        },
    ],
)
def test_runs_over_the_memory_budget_are_refused_before_allocation(hub, overrides):
    rss_before = rss_mib()
    started = time.monotonic()
    r = hub.post(Identity.generate(), f"{API}/runs", {"config": run_config(**overrides)})
    body = refused(r, 422, Refusal.OVER_MEMORY)
    assert "MiB" in body["detail"] and "budget" in body["detail"]
    assert time.monotonic() - started < 30.0  # (the first import of transformers is slow)
    assert rss_mib() - rss_before < 100  # nothing was built


@pytest.mark.parametrize(
    "hf_config",
    [
        {"hidden_size": "x"},
        {"num_hidden_layers": -1},
        {"torch_dtype": "nonsense"},
        {"num_attention_heads": 0},
        {"layer_types": 7},
        {"hidden_size": 64, "num_attention_heads": 3},
    ],
)
def test_hostile_hugging_face_configs_are_refused(hub, hf_config):
    model = {"kind": "hf", "architecture": "llama", "hf_config": hf_config}
    r = hub.post(Identity.generate(), f"{API}/runs", {"config": run_config(model=model)})
    assert r.status_code == 422, r.text
    assert "hf_config" in r.json()["detail"]


def test_memory_budget_is_the_hubs_choice(tmp_path):
    small = Hub(tmp_path, HubSettings(max_run_memory_mb=1))
    r = small.post(Identity.generate(), f"{API}/runs", {"config": run_config()})
    refused(r, 422, Refusal.OVER_MEMORY)


def test_fund_amount_is_bounded(hub):
    sponsor = Identity.generate()
    run_id = hub.create_run(sponsor, run_config())
    before = hub.snapshot()
    huge = fund_claim(sponsor, 2**64, run_id=run_id).to_dict()
    refused(hub.post(sponsor, f"{API}/runs/{run_id}/fund", huge), 422, Refusal.MALFORMED)
    assert hub.snapshot() == before
    ok = fund_claim(sponsor, 10**15, run_id=run_id).to_dict()
    assert hub.post(sponsor, f"{API}/runs/{run_id}/fund", ok).status_code == 200


# ---------------------------------------------------------------- nodes


@pytest.mark.parametrize(
    "body",
    [
        '{"probe_tokens_per_s": Infinity, "probe_numel": 1000}',
        '{"probe_tokens_per_s": 1e308, "probe_numel": 1000}',
        '{"probe_tokens_per_s": NaN, "probe_numel": 1000}',
        '{"probe_tokens_per_s": 1000, "probe_numel": 1' + "0" * 400 + "}",
        '{"probe_tokens_per_s": 1000, "probe_numel": 1000, "region": "\\ud800"}',
        '{"probe_tokens_per_s": 1000, "probe_numel": 1000, "name": "a\\u0000b"}',
        '{"probe_tokens_per_s": 1000, "probe_numel": 1000, "hardware": {"cores": 1e400}}',
    ],
)
def test_hostile_registrations_are_refused(hub, body):
    before = hub.snapshot()
    r = hub.post(Identity.generate(), f"{API}/nodes/register", body)
    refused(r, 422, Refusal.MALFORMED)
    assert hub.snapshot() == before


@pytest.mark.parametrize("wait_s", ["nan", "inf", "-1", "61", "1e999"])
def test_wait_s_must_be_finite_and_bounded(hub, wait_s):
    node = Identity.generate()
    hub.register(node)
    run_id = hub.create_run(Identity.generate(), run_config())
    started = time.monotonic()
    for path in (f"{API}/runs/{run_id}/assignment", f"{API}/runs/{run_id}/secagg/task"):
        r = hub.post(node, path, {"assignment_id": "0" * 32}, params={"wait_s": wait_s})
        refused(r, 422, Refusal.MALFORMED)
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize(
    "path",
    [
        f"{API}/runs/abc/secagg/99999999999999999999/0/share",
        f"{API}/runs/abc/secagg/0/-1/share",
        f"{API}/runs/{'x' * 100}/assignment",
        f"{API}/runs/a%2Fb/contributions",
    ],
)
def test_hostile_path_parameters_are_refused(hub, path):
    node = Identity.generate()
    hub.register(node)
    r = hub.post(node, path, b"{}")
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["reason"] in set(Refusal)


def test_hostile_reads_are_refused(hub):
    for path in (
        f"{API}/blobs/{'z' * 64}",
        f"{API}/nodes/%ED%A0%80/balance",
        f"{API}/ledger?limit=1e999",
        f"{API}/ledger?start_seq=99999999999999999999999",
        f"{API}/runs/{'x' * 100}",
    ):
        r = hub.http.get(path)
        assert 400 <= r.status_code < 500, (path, r.text)


# ---------------------------------------------------------------- contributions


def assigned(hub: Hub, **overrides):
    node, sponsor = Identity.generate(), Identity.generate()
    hub.register(node)
    run_id = hub.create_run(sponsor, run_config(**overrides))
    return node, run_id, hub.assignment(node, run_id)


@pytest.mark.parametrize(
    "meta",
    [
        {"energy_method": "\ud800"},
        {"region": "\ud800"},
        {"loss_first": float("inf")},
        {"train_time_s": 1e308},
        {"energy_wh": float("nan")},
        {"threads": 10**400},
    ],
)
def test_hostile_contribution_metadata_is_refused(hub, meta):
    node, run_id, a = assigned(hub)
    fields = meta_fields(a, TOKENS_PER_STEP, **meta)  # packed as is, not through pydantic
    body = pack(make_codec("int8").encode(torch.zeros(hub.numel(run_id))), fields)
    before, blob_bytes = hub.snapshot(), hub.blob_bytes()
    r = hub.post(node, f"{API}/runs/{run_id}/contributions", body)
    refused(r, 422, Refusal.MALFORMED)
    assert hub.snapshot() == before and hub.blob_bytes() == blob_bytes


def test_surrogate_assignment_id_is_refused(hub):
    node, run_id, a = assigned(hub)
    body = contribution(a, hub.numel(run_id), TOKENS_PER_STEP)
    body = body.replace(a.id.encode(), b"\\ud800" + a.id[6:].encode())
    before = hub.snapshot()
    r = hub.post(node, f"{API}/runs/{run_id}/contributions", body)
    assert 400 <= r.status_code < 500, r.text
    assert hub.snapshot() == before


def test_failed_commit_leaves_no_blob_and_the_assignment_open(hub, monkeypatch):
    node, run_id, a = assigned(hub)
    body = contribution(a, hub.numel(run_id), TOKENS_PER_STEP)
    before, blob_bytes = hub.snapshot(), hub.blob_bytes()

    def broken(*_args, **_kwargs):
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(hub.service.trust, "record_submission", broken)
    assert hub.post(node, f"{API}/runs/{run_id}/contributions", body).status_code == 500
    assert hub.blob_bytes() == blob_bytes
    assert hub.snapshot() == before  # the assignment is still open: the node may retry
    monkeypatch.undo()
    r = hub.post(node, f"{API}/runs/{run_id}/contributions", body)
    assert r.status_code == 200, r.text
    assert hub.blob_bytes() > blob_bytes


def test_uploads_are_checked_side_by_side_outside_the_lock(hub, monkeypatch):
    """Decoding and checking an upload (the costly part) holds no lock: two uploads' checks
    meet at a barrier, which under a lock they never could (it would break after 30 s)."""
    uploads = []
    for _ in range(2):  # two runs: the hub's lock is one for all of them
        node, run_id, a = assigned(hub)
        uploads.append((run_id, node.node_id, contribution(a, hub.numel(run_id), TOKENS_PER_STEP)))
    barrier, seen = threading.Barrier(2, timeout=30), threading.local()
    check = hub.service.uploads._check_payload

    def meeting(cfg, tensors, numel):
        if not getattr(seen, "met", False):  # the first check of each upload, not the recheck
            seen.met = True
            barrier.wait()
        check(cfg, tensors, numel)

    monkeypatch.setattr(hub.service.uploads, "_check_payload", meeting)
    with ThreadPoolExecutor(2) as pool:
        acks = list(pool.map(lambda u: hub.service.uploads.submit(*u), uploads))
    assert all(ack.accepted for ack in acks)


def test_a_retried_upload_keeps_the_stored_blob(hub):
    node, run_id, a = assigned(hub)
    body = contribution(a, hub.numel(run_id), TOKENS_PER_STEP)
    ack = hub.service.uploads.submit(run_id, node.node_id, body)
    r = hub.post(node, f"{API}/runs/{run_id}/contributions", body)  # the ack was lost: again
    refused(r, 409, Refusal.DUPLICATE)
    assert hub.service.blobs.get(ack.contribution_id) == body  # the refusal removed nothing


def test_false_claim_has_a_typed_reason_and_goes_on_the_ledger(hub):
    node, run_id, a = assigned(hub)
    body = contribution(a, hub.numel(run_id), TOKENS_PER_STEP, tokens=7)
    r = hub.post(node, f"{API}/runs/{run_id}/contributions", body)
    refused(r, 400, Refusal.FALSE_CLAIM)
    verdicts = hub.get(f"{API}/ledger", kind="verdict").json()
    assert any("false claim" in v["payload"]["reason"] for v in verdicts)


# ---------------------------------------------------------------- runs are isolated


def test_one_bad_run_never_stops_the_others(hub):
    node = Identity.generate()
    hub.register(node)
    sponsor_of_bad = Identity.generate()
    bad = hub.create_run(sponsor_of_bad, run_config())
    good = hub.create_run(Identity.generate(), run_config())
    in_bad = hub.assignment(node, bad)
    with hub.service.sessions() as s:  # e.g. written by an older hub: cannot be read back
        s.execute(update(m.Run).where(m.Run.id == bad).values(config_json='{"train": null}'))
        s.commit()
    a = hub.assignment(node, good)
    body = contribution(a, hub.numel(good), TOKENS_PER_STEP)
    assert hub.post(node, f"{API}/runs/{good}/contributions", body).status_code == 200
    hub.service.ticker.tick()
    assert hub.run_row(good).version == 1
    late = contribution(in_bad, hub.numel(good), TOKENS_PER_STEP)
    blob_bytes = hub.blob_bytes()
    r = hub.post(node, f"{API}/runs/{bad}/contributions", late)
    refused(r, 409, Refusal.UNREADABLE_SETTINGS)
    assert hub.blob_bytes() == blob_bytes
    r = hub.post(node, f"{API}/runs/{bad}/assignment", params={"wait_s": 0})
    assert r.json()["status"] == "wait" and "stalled" in r.json()["reason"]
    status = hub.get(f"{API}/runs/{bad}")
    assert status.status_code == 200
    assert status.json()["status"] == "stalled"
    assert "no longer validate" in status.json()["status_reason"]
    r = hub.post(sponsor_of_bad, f"{API}/runs/{bad}/state", {"event": "resume"})
    refused(r, 409, Refusal.UNREADABLE_SETTINGS)  # not a 500: not until its settings validate
    # a SecAgg advertisement names the run too: the same typed 409, nothing stored
    meta = meta_fields(in_bad, TOKENS_PER_STEP, codec="secagg-u32")
    keys = {"cipher_key": "A" * 43 + "=", "mask_key": "B" * 43 + "="}
    before = hub.snapshot()
    r = hub.post(node, f"{API}/runs/{bad}/secagg/advertise", {"meta": meta} | keys)
    refused(r, 409, Refusal.UNREADABLE_SETTINGS)
    assert hub.snapshot() == before
    assert hub.get(f"{API}/runs").status_code == 200
    # looking up which blobs are public datasets reads every run: the bad one is skipped
    assert hub.get(f"{API}/blobs/{'0' * 64}").status_code == 404


def test_a_run_failing_once_is_not_stopped(hub, monkeypatch):
    run_id = hub.create_run(Identity.generate(), run_config())
    calls = []
    real = hub.service.ticker.advance

    def flaky(rid, **kwargs):
        calls.append(rid)
        if len(calls) == 1:
            raise OperationalError("SELECT", {}, Exception("database is locked"))
        return real(rid, **kwargs)

    monkeypatch.setattr(hub.service.ticker, "advance", flaky)
    hub.service.ticker.tick()
    hub.service.ticker.tick()
    assert hub.run_row(run_id).status == "active"


# ---------------------------------------------------------------- restarts


def test_hub_outage_longer_than_liveness_loses_no_node(tmp_path):
    first = Hub(tmp_path)
    node = Identity.generate()
    first.register(node)
    run_id = first.create_run(Identity.generate(), run_config())
    a = first.assignment(node, run_id)
    first.clock.advance(25)  # the hub is down for longer than liveness_s (20 s)
    second = Hub(tmp_path)  # restarted on the same database and blobs
    second.clock.now_s = first.clock.now_s
    second.service.started_at = second.clock()
    second.service.ticker.tick()
    body = contribution(a, second.numel(run_id), TOKENS_PER_STEP)
    r = second.post(node, f"{API}/runs/{run_id}/contributions", body)
    assert r.status_code == 200, r.text
    second.clock.advance(21)  # still silent after the restart: now it is lost
    node2 = Identity.generate()
    second.register(node2)
    second.service.ticker.tick()
    assert second.run_row(run_id).version == 1


def test_re_registering_releases_the_old_assignment(hub):
    a_node, b_node = Identity.generate(), Identity.generate()
    hub.register(a_node)
    hub.register(b_node)
    run_id = hub.create_run(Identity.generate(), run_config(round={"deadline_s": 30, "quorum": 1}))
    old = hub.assignment(a_node, run_id)
    b = hub.assignment(b_node, run_id)
    r = hub.post(
        b_node,
        f"{API}/runs/{run_id}/contributions",
        contribution(b, hub.numel(run_id), TOKENS_PER_STEP),
    )
    assert r.status_code == 200
    hub.service.ticker.tick()
    assert hub.run_row(run_id).version == 0  # waits for node a
    hub.register(a_node)  # node a's process restarted with the same key
    hub.service.ticker.tick()
    assert hub.run_row(run_id).version == 1  # closed now, not at the 30 s deadline
    late = contribution(old, hub.numel(run_id), TOKENS_PER_STEP)
    refused(hub.post(a_node, f"{API}/runs/{run_id}/contributions", late), 409, Refusal.STALE)


# ---------------------------------------------------------------- who may do how much


def test_sponsor_allow_list(tmp_path):
    sponsor, stranger = Identity.generate(), Identity.generate()
    hub = Hub(tmp_path, HubSettings(sponsors=frozenset({sponsor.public_key.hex()})))
    run_id = hub.create_run(sponsor, run_config())
    r = hub.post(stranger, f"{API}/runs", {"config": run_config()})
    refused(r, 403, Refusal.NOT_SPONSOR)
    claim = fund_claim(stranger, 100, run_id=run_id).to_dict()
    refused(hub.post(stranger, f"{API}/runs/{run_id}/fund", claim), 403, Refusal.NOT_SPONSOR)


def test_open_hub_quotas(tmp_path):
    settings = HubSettings(max_active_runs_per_identity=1, max_runs_per_hour_per_identity=2)
    hub = Hub(tmp_path, settings)
    sponsor = Identity.generate()
    first = hub.create_run(sponsor, run_config())
    refused(hub.post(sponsor, f"{API}/runs", {"config": run_config()}), 429, Refusal.QUOTA)
    with hub.service.sessions() as s:
        s.execute(update(m.Run).where(m.Run.id == first).values(status="finished"))
        s.commit()
    hub.create_run(sponsor, run_config())
    with hub.service.sessions() as s:
        s.execute(update(m.Run).values(status="finished"))
        s.commit()
    r = hub.post(sponsor, f"{API}/runs", {"config": run_config()})
    refused(r, 429, Refusal.QUOTA)
    assert 0 < int(r.headers["retry-after"]) <= 3600
    hub.clock.advance(3601)
    hub.create_run(sponsor, run_config())
    hub.create_run(Identity.generate(), run_config())  # another identity has its own quota


def nonce_count(hub: Hub) -> int:
    with hub.service.sessions() as s:
        return s.scalar(select(func.count()).select_from(m.Nonce))


def test_rate_limit_per_key(tmp_path):
    hub = Hub(tmp_path, HubSettings(requests_per_s=1, request_burst=3))
    node = Identity.generate()
    hub.register(node)
    for _ in range(2):
        assert hub.post(node, f"{API}/nodes/heartbeat", {}).status_code == 200
    nonces = nonce_count(hub)
    r = hub.post(node, f"{API}/nodes/heartbeat", {})
    refused(r, 429, Refusal.RATE_LIMITED)
    assert int(r.headers["retry-after"]) >= 1
    assert nonce_count(hub) == nonces  # a flood writes nothing
    assert hub.post(Identity.generate(), f"{API}/nodes/heartbeat", {}).status_code == 403
    hub.clock.advance(1.0)
    assert hub.post(node, f"{API}/nodes/heartbeat", {}).status_code == 200


def allowed(limiters: list[RateLimiter], key: str, requests: int, now_s: float) -> int:
    """How many of `requests` from `key` at `now_s`, spread round-robin over `limiters` (the
    hub's processes), their buckets let through."""
    return sum(
        limiters[i % len(limiters)].retry_after_s(key, now_s) is None for i in range(requests)
    )


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_replicas_together_never_exceed_the_configured_rate(processes):
    """N hub processes each enforce 1/N of the rate and burst: a key spread over all of them
    gets exactly the configured burst and rate, one that sticks to one process 1/N of them."""
    limiters = [RateLimiter(10.0, 40.0, processes=processes) for _ in range(processes)]
    assert allowed(limiters, "spread", 200, 1000.0) == 40  # the burst, not N times it
    assert allowed(limiters, "spread", 200, 1002.0) == 20  # two seconds: the rate, not N times
    assert allowed(limiters, "spread", 200, 1002.0) == 0
    assert allowed(limiters[:1], "stuck", 200, 1000.0) == 40 // processes
    assert allowed(limiters[:1], "stuck", 200, 1002.0) == 20 // processes


def test_a_share_below_one_request_or_a_bad_rate_is_refused():
    assert replica_share(50.0, 200.0, 8) == (6.25, 25.0)
    assert MAX_RATE_PROCESSES == MAX_REPLICA_COUNT * MAX_WORKERS
    for rate, burst, processes, words in [
        (0.1, 0.4, 1, "less than one request"),  # `--requests-per-s 0.1`: no request ever passed
        (1.0, 4.0, 5, "at least 1.25"),
        (float("inf"), 4.0, 1, "finite"),
        (float("nan"), 4.0, 1, "finite"),
        (0.0, 4.0, 1, "> 0"),
        (1.0, float("nan"), 1, "burst must be finite"),
        (1.0, 4.0, 0, "processes must be in"),
        (1e9, 4e9, MAX_RATE_PROCESSES + 1, "processes must be in"),
    ]:
        with pytest.raises(ValueError, match=words):
            replica_share(rate, burst, processes)


def test_the_hub_enforces_its_share_of_the_rate(tmp_path):
    """HubSettings' replica_count × workers processes: this one lets a key through its share."""
    hub = Hub(tmp_path, HubSettings(requests_per_s=3, request_burst=6, replica_count=3))
    node = Identity.generate()
    hub.register(node)  # one of the 2 requests this process's bucket holds (6 / 3)
    assert hub.post(node, f"{API}/nodes/heartbeat", {}).status_code == 200
    r = hub.post(node, f"{API}/nodes/heartbeat", {})
    refused(r, 429, Refusal.RATE_LIMITED)
    assert "3 requests/s from this key (1/s at each of 3 hub processes)" in r.json()["detail"]
    hub.clock.advance(1.0)
    assert hub.post(node, f"{API}/nodes/heartbeat", {}).status_code == 200


# ---------------------------------------------------------------- the OpenAPI document


def test_openapi_names_every_body_and_error(hub):
    doc = hub.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    posts = {path: ops["post"] for path, ops in doc["paths"].items() if "post" in ops}
    assert len(posts) >= 12
    for path, op in posts.items():
        content = op.get("requestBody", {}).get("content")
        assert content, f"POST {path} has no requestBody"
        for media in content.values():
            ref = media["schema"].get("$ref")
            if ref:
                assert ref.rsplit("/", 1)[1] in schemas, (path, ref)
        errors = [code for code in op["responses"] if code.startswith("4")]
        assert {"401", "422"} <= set(errors), (path, errors)
        assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/Problem"
        )
    contribution_body = posts[f"{API}/runs/{{run_id}}/contributions"]["requestBody"]
    assert "application/octet-stream" in contribution_body["content"]
    assert "Refusal" in schemas
