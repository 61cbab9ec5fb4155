"""Three hub replica processes on one PostgreSQL and one S3-compatible object store (moto's
server), three nodes given all three URLs and downloading through presigned URLs; replicas are
SIGKILLed (by pid) and restarted while the run trains. Nothing acknowledged is lost, no round
waits for its deadline, and the ledger stays one verifiable chain."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from gridswarm.hub import models as m
from gridswarm.hub.server import SQLITE_REPLICAS, make_engine
from gridswarm.identity import Identity, sign_request
from gridswarm.node.client import HubClient, tls_verify
from gridswarm.protocol import API, Refusal
from gridswarm.s3blobs import S3BlobStore
from gridswarm.swarm import free_port, wait_healthy
from tests.conftest import tiny_run, wait_for
from tests.test_tls import make_ca, make_server_cert

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
ROUNDS = 16  # the five kills land in the first ~25 s; the rounds go on past them
DEADLINE_S = 90  # generous: a round that waited for it would show as closed at the deadline
MAX_KILLS = 5


def answers(url: str) -> bool:
    """Whether the hub at `url` answers /healthz now."""
    try:
        return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False


def acknowledged(log_text: str, run_id: str) -> list[int]:
    """Rounds whose contribution the node saw acknowledged (or stored by an earlier try)."""
    pattern = rf"run {run_id} round (\d+): (?:H=|already stored)"
    return [int(r) for r in re.findall(pattern, log_text)]


def test_replicas_survive_sigkill_and_lose_nothing_acknowledged(pg_database, s3_server, make_swarm):
    # pg_database first: its database is dropped only after the swarm's processes stopped
    swarm = make_swarm(db_url=pg_database, liveness_s=8.0)
    swarm.blobs = f"s3://gridswarm-replicas/{uuid.uuid4().hex[:8]}"
    S3BlobStore.from_url(swarm.blobs).ensure_bucket()
    ports = [free_port() for _ in range(3)]
    urls = [swarm.start_replica(port) for port in ports]
    hub_list = ",".join(urls)
    sponsor = HubClient(hub_list, Identity.generate(), retry_for_s=60)
    config = tiny_run(
        round={"deadline_s": DEADLINE_S, "quorum": 2, "min_nodes": 2, "max_nodes": 3},
        budget={"rounds": ROUNDS},
    )
    run_id = sponsor.create_run(config).run_id
    nodes = {  # throttled: rounds last long enough for the kills, without more CPU
        swarm.start_node(f"n{i}", run_id, throttle=0.5, hub_url=hub_list): f"n{i}" for i in range(3)
    }

    kills = 0
    next_kill = time.monotonic() + 6.0
    give_up = time.monotonic() + 240.0
    while time.monotonic() < give_up:
        status = sponsor.run_status(run_id)
        if status["status"] == "finished":
            break
        up = [p for p, url in zip(ports, urls, strict=True) if answers(url)]
        # kill only while another replica is up, so that one always serves (a restart takes
        # seconds: without this all three could be down at once)
        if kills < MAX_KILLS and time.monotonic() >= next_kill and len(up) >= 2:
            port = up[kills % len(up)]
            swarm.kill_replica(port)  # SIGKILL by pid
            kills += 1
            time.sleep(0.5)
            swarm.start_replica(port, wait=False)
            next_kill = time.monotonic() + 2.5
        time.sleep(0.3)
    status = wait_for(
        lambda: (s := sponsor.run_status(run_id))["status"] == "finished" and s, 30, "the run"
    )
    assert kills >= 3, f"the run finished after {kills} kills: too fast to test anything"
    print(f"{kills} replicas killed during {ROUNDS} rounds")
    assert status["version"] == ROUNDS

    verify = sponsor.request("GET", "/v1/ledger/verify", signed=False).json()
    assert verify["ok"] is True, verify

    engine = make_engine(pg_database)
    with Session(engine) as s:
        stored = Counter(
            (c.node_id, c.round)
            for c in s.scalars(select(m.Contribution).where(m.Contribution.run_id == run_id))
        )
        rounds = s.scalars(select(m.Round).where(m.Round.run_id == run_id)).all()
        versions = s.scalars(
            select(m.Version.number).where(m.Version.run_id == run_id).order_by(m.Version.number)
        ).all()
    engine.dispose()
    assert versions == list(range(ROUNDS + 1))  # each version published once
    assert all(count == 1 for count in stored.values()), stored
    for node_id, name in nodes.items():
        log_text = (swarm.workdir / f"{name}.log").read_text()
        for rnd in acknowledged(log_text, run_id):
            assert stored[(node_id, rnd)] == 1, f"{name}'s acknowledged round {rnd} is not stored"
    closed = [r for r in rounds if r.status == "closed"]
    assert len(closed) == ROUNDS
    # no round waited for its deadline because a replica died: all closed with every answer in
    assert [r.close_reason for r in closed] == ["all-in"] * ROUNDS
    assert all(r.closed_at - r.opened_at < DEADLINE_S / 2 for r in closed)
    # the nodes downloaded from the object store: no replica served a model byte itself
    served = [
        httpx.get(f"{url}/healthz", timeout=10).json()["blobs"]["served_bytes"]
        for url in urls
        if answers(url)
    ]
    assert served and all(b == 0 for b in served), served


def children(pid: int) -> set[int]:
    """The child processes of `pid` (Linux /proc)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in text.split()}


RATE_PER_S = 2.0  # the hub's --requests-per-s in the workers test: burst 8, 4 per worker


def flood_through_both_workers(url: str, requests: int = 40) -> None:
    """One key's signed requests, each on a new connection (the kernel hands them to either
    worker): together the workers let through no more than the configured burst and rate."""
    flooder = Identity.generate()
    path = f"{API}/nodes/heartbeat"
    passed, refusals = 0, []
    started = time.monotonic()
    for _ in range(requests):
        headers = sign_request(flooder, "POST", path, b"{}")
        r = httpx.post(url + path, content=b"{}", headers=headers, timeout=30)
        if r.status_code == 429:
            refusals.append(r.json())
        else:
            passed += 1  # through the bucket (then 403: this key never registered)
            assert r.status_code == 403, r.text
    elapsed_s = time.monotonic() - started
    # the whole hub: burst 4 × RATE_PER_S at once, RATE_PER_S a second after (one worker alone
    # would allow half of each; each on its own, as before, twice)
    assert 1 <= passed <= 4 * RATE_PER_S + RATE_PER_S * elapsed_s, (passed, elapsed_s)
    assert refusals and all(p["reason"] == Refusal.RATE_LIMITED for p in refusals)
    assert "(1/s at each of 2 hub processes)" in refusals[0]["detail"]


def both_workers_in_every_scrape(url: str, heartbeats: int) -> None:
    """`/metrics` on fresh connections (either worker answers): each scrape counts the
    `heartbeats` refused heartbeats of both workers, and only itself in flight."""
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(6):
        text = httpx.get(f"{url}/metrics", timeout=30).text
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        route = (("method", "POST"), ("route", f"{API}/nodes/heartbeat"), ("status", "4xx"))
        assert samples[("gridswarm_http_requests_total", route)] == heartbeats
        assert samples[("gridswarm_http_requests_in_flight", ())] == 1


@pytest.mark.parametrize("tls", [False, True], ids=["http", "tls"])
def test_hub_workers_share_one_port_and_a_killed_one_is_replaced(pg_database, tmp_path, tls):
    port = free_port()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "gridswarm.cli", "hub", "--blobs", str(tmp_path / "blobs")]
    ca = None
    if tls:  # every worker serves the same certificate on the shared socket
        ca, ca_key, ca_cert = make_ca(tmp_path, "test-ca")
        cert, key = make_server_cert(tmp_path, ca_key, ca_cert)
        args += ["--tls-cert", str(cert), "--tls-key", str(key)]
    refused = subprocess.run(
        [*args, "--db", f"sqlite:///{tmp_path}/hub.db", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert refused.returncode != 0
    assert [line for line in refused.stderr.splitlines() if line.strip()] == [
        "error: " + SQLITE_REPLICAS
    ]
    if not tls:  # 2 processes cannot split a burst of 0.4 (--requests-per-s 0.1, burst 4x)
        refused = subprocess.run(
            [*args, "--db", pg_database, "--workers", "2", "--requests-per-s", "0.1"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert refused.returncode != 0 and "less than one request" in refused.stderr
    rate = ["--requests-per-s", str(RATE_PER_S)]
    with open(tmp_path / "hub.log", "ab") as log:  # the process keeps its own copy
        hub = subprocess.Popen(
            [*args, "--db", pg_database, "--port", str(port), "--workers", "2", *rate],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_healthy(url, hub, timeout_s=90, verify=tls_verify(ca) if tls else True)
        workers = wait_for(lambda: len(children(hub.pid)) == 2 and children(hub.pid), 60, "2")
        if not tls:
            flood_through_both_workers(url)
            both_workers_in_every_scrape(url, 40)
        sponsor = HubClient(url, Identity.generate(), retry_for_s=30, ca=ca)
        run_id = sponsor.create_run(tiny_run()).run_id
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        replaced = wait_for(
            lambda: (now := children(hub.pid)) and len(now) == 2 and victim not in now and now,
            60,
            "the killed worker to be replaced",
        )
        assert len(replaced & workers) == 1
        for _ in range(6):  # whichever worker answers, it knows the run
            assert sponsor.run_status(run_id)["status"] == "active"
        verify = tls_verify(ca) if tls else True
        for _ in range(8):  # fresh connections: the kernel hands them to either worker
            assert httpx.get(f"{url}/v1/runs/{run_id}", verify=verify, timeout=30).is_success
        if not tls:  # the killed worker's counts stay; its in-flight gauge does not
            both_workers_in_every_scrape(url, 40)
        hub.send_signal(signal.SIGTERM)
        assert hub.wait(timeout=30) == 0
        folder = re.search(r"replicas' metrics in (\S+)", (tmp_path / "hub.log").read_text())
        assert folder is not None and not Path(folder[1]).exists()  # removed with the hub
    finally:
        if hub.poll() is None:
            hub.kill()
            hub.wait(timeout=10)
