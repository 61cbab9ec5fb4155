"""A hub process on `--blobs s3://` (the moto server) with node processes: versions, deltas and
dataset shards reach the nodes through presigned URLs, not through the hub, and a tampered object
is refused by the node, reported, never cached, and the run goes on once the object is right."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gridswarm.identity import Identity
from gridswarm.node.client import HubClient
from gridswarm.s3blobs import S3BlobStore
from gridswarm.train.dataset import prepare
from tests.conftest import tiny_run, wait_for

SHAKESPEARE = Path(__file__).resolve().parent.parent / "src/gridswarm/data/tinyshakespeare.txt"


def _cached(home: Path) -> set[str]:
    return {p.name for p in (home / "blobs").rglob("*") if p.is_file()}


@pytest.mark.slow
def test_live_s3_hub_sends_nodes_to_the_object_store(s3_server, make_swarm, tmp_path):
    corpus = tmp_path / "corpus"
    manifest, _ = prepare([SHAKESPEARE], "bytes", corpus, shard_tokens=200_000)
    store = S3BlobStore.from_url("s3://gridswarm-live/hub")
    store.ensure_bucket()
    swarm = make_swarm()
    swarm.blobs = "s3://gridswarm-live/hub"
    swarm.start_hub()
    sponsor = HubClient(swarm.url, Identity.generate(), retry_for_s=30)
    config = tiny_run(
        data={"dataset": str(corpus), "slice_shards": 1},
        train={"seq_len": 32, "batch_size": 8, "inner_steps": 10, "min_inner_steps": 5},
        round={"deadline_s": 60, "quorum": 1, "min_nodes": 1},
        budget={"rounds": 3},
    )
    run_id = sponsor.create_run(config).run_id
    swarm.start_node("n0", run_id)
    status = wait_for(
        lambda: (s := sponsor.run_status(run_id))["status"] == "finished" and s, 180, "the run"
    )
    assert [n["contributions"] for n in status["nodes"]] == [3]
    assert status["nodes"][0]["bytes_down"] > 0  # redirected ranges still count per node
    blobs = httpx.get(f"{swarm.url}/healthz", timeout=10).json()["blobs"]
    # version 0, deltas, the manifest and shards: all by redirect, not one byte from the hub
    assert blobs["served"] == 0 and blobs["served_bytes"] == 0, blobs
    assert blobs["redirected"] >= 4, blobs
    cached = _cached(swarm.workdir / "n0")
    assert any(s.sha256 in cached for s in manifest.train)  # shards it trained on, verified
    hub_cache = {p.name for p in (swarm.workdir / "hub-home" / "blob-cache").rglob("*")}
    assert {s.sha256 for s in manifest.val} <= hub_cache  # the hub's eval reads them as files

    # a second run whose first version is tampered with in S3: a fresh node refuses it
    second = sponsor.create_run({**config, "name": "second", "budget": {"rounds": 1}}).run_id
    weights = sponsor.request("GET", f"/v1/runs/{second}/versions/latest").json()["weights_blob"]
    good = store.get(weights)
    store.client.put_object(Bucket=store.bucket, Key=store._key(weights), Body=good[::-1])
    swarm.start_node("n1", second)

    def failure() -> str | None:
        nodes = sponsor.run_status(second)["nodes"]
        return next((n["last_failure"] for n in nodes if n["last_failure"]), None)

    reason = wait_for(failure, 120, "the node to report the tampered version")
    assert "does not match its hash" in reason
    assert weights not in _cached(swarm.workdir / "n1")
    store.client.put_object(Bucket=store.bucket, Key=store._key(weights), Body=good)
    done = wait_for(
        lambda: (s := sponsor.run_status(second))["status"] != "active" and s, 120, "run two"
    )
    assert done["status"] == "finished", done
    assert weights in _cached(swarm.workdir / "n1")
    assert httpx.get(f"{swarm.url}/healthz", timeout=10).json()["blobs"]["served"] == 0
