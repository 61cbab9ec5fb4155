"""Presigned downloads from an S3 hub (issue 11), in process: a real hub service and app over the
moto S3 server (TestClient), real signed clients, real presigned URLs fetched over HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from gridswarm.blobs import BlobError, sha256_hex
from gridswarm.hub.app import create_app
from gridswarm.hub.server import build_service
from gridswarm.hub.service import HubService, HubSettings
from gridswarm.identity import HEADER_SIGNATURE, Identity
from gridswarm.node.client import HubClient
from gridswarm.train.dataset import prepare
from tests.conftest import tiny_run

SHAKESPEARE = Path(__file__).resolve().parent.parent / "src/gridswarm/data/tinyshakespeare.txt"
Hub = tuple[HubService, TestClient, Callable[[Identity], HubClient]]


@pytest.fixture
def s3_hub(s3_server, tmp_path: Path) -> Iterator[Callable[..., Hub]]:
    """`make(presign=True)` -> (service, raw test client, connect(identity) -> HubClient) for a
    hub whose blobs are in S3 (its own prefix per hub, its cache under its home)."""
    opened: list[TestClient] = []

    def make(presign: bool = True) -> Hub:
        n = len(opened)
        settings = HubSettings(presign_downloads=presign, data_roots=(tmp_path,))
        service = build_service(
            f"sqlite:///{tmp_path}/hub{n}.db",
            f"s3://gridswarm-presign/hub{n}",
            settings,
            home=tmp_path / f"home{n}",
        )
        service.blobs.s3.ensure_bucket()
        http = TestClient(create_app(service), follow_redirects=False)
        http.__enter__()
        opened.append(http)

        def connect(identity: Identity) -> HubClient:
            client = HubClient("http://testserver", identity, retry_for_s=2)
            client.http = http
            return client

        return service, http, connect

    yield make
    for http in opened:
        http.__exit__(None, None, None)


def _weights(connect: Callable[[Identity], HubClient], config: dict) -> tuple[HubClient, str]:
    sponsor = connect(Identity.generate())
    run_id = sponsor.create_run(config).run_id
    return sponsor, sponsor.request("GET", f"/v1/runs/{run_id}/versions/latest").json()[
        "weights_blob"
    ]


def test_published_blobs_redirect_to_presigned_urls_others_404(s3_hub, tmp_path):
    service, http, connect = s3_hub()
    node, weights = _weights(connect, tiny_run())
    data = service.blobs.get(weights)

    answer = http.get(f"/v1/blobs/{weights}")
    assert answer.status_code == 307 and answer.content == b""  # not one byte from the hub
    location = answer.headers["location"]
    assert location.startswith("http://127.0.0.1:") and "Signature=" in location
    assert httpx.get(location, timeout=10).content == data
    ranged = http.get(f"/v1/blobs/{weights}", headers={"range": "bytes=10-19"})
    assert ranged.status_code == 307
    part = httpx.get(ranged.headers["location"], headers={"range": "bytes=10-19"}, timeout=10)
    assert part.status_code == 206 and part.content == data[10:20]

    secret = service.blobs.put(b"a contribution's bytes: stored, never published")
    for digest in (secret, "0" * 64):
        refused = http.get(f"/v1/blobs/{digest}")
        assert refused.status_code == 404 and "location" not in refused.headers
        assert refused.json()["detail"].endswith(
            "is not a published model version, delta or dataset blob"
        )
    bad = http.get(f"/v1/blobs/{weights}", headers={"range": f"bytes={len(data)}-"})
    assert bad.status_code == 416 and "location" not in bad.headers

    # the node's resumable ranged download follows every redirect and checks the sha256
    got = tmp_path / "dl" / "w.part"
    assert node.fetch_blob(weights, got, chunk_bytes=4096) == len(data)
    assert sha256_hex(got.read_bytes()) == weights
    assert node.blob(weights) == data
    resumed = tmp_path / "dl" / "resumed.part"  # a download cut short resumes from the store
    resumed.write_bytes(data[:5000])
    assert node.fetch_blob(weights, resumed, chunk_bytes=4096) == len(data) - 5000
    assert resumed.read_bytes() == data
    counters = http.get("/healthz").json()["blobs"]
    assert counters["served"] == 0 and counters["served_bytes"] == 0
    assert counters["redirected"] >= 3 + len(data) // 4096


def test_the_object_store_never_sees_the_nodes_signature(s3_hub, tmp_path):
    _, _, connect = s3_hub()
    node, weights = _weights(connect, tiny_run())
    seen: list[httpx.Headers] = []

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            seen.append(request.headers)
            return super().handle_request(request)

    node.object_http = httpx.Client(transport=Recording(), timeout=10)
    node.fetch_blob(weights, tmp_path / "w.part", chunk_bytes=1 << 16)
    assert seen and all(h.get("range", "").startswith("bytes=") for h in seen)
    leaked = {k for h in seen for k in h if k.lower().startswith("x-gridswarm")}
    assert not leaked and not any(HEADER_SIGNATURE.lower() in h for h in seen)


def test_wrong_bytes_behind_a_presigned_url_are_refused_and_not_kept(s3_hub, tmp_path):
    service, _, connect = s3_hub()
    node, weights = _weights(connect, tiny_run())
    s3 = service.blobs.s3
    good = s3.get(weights)
    s3.client.put_object(Bucket=s3.bucket, Key=s3._key(weights), Body=good[:-8] + b"tampered")
    part = tmp_path / "w.part"
    with pytest.raises(BlobError, match="does not match its hash"):
        node.fetch_blob(weights, part, chunk_bytes=4096)
    assert not part.exists()  # discarded: the next try starts over
    with pytest.raises(BlobError, match="does not match its hash"):
        node.blob(weights)
    s3.client.put_object(Bucket=s3.bucket, Key=s3._key(weights), Body=good)
    assert node.fetch_blob(weights, part, chunk_bytes=4096) == len(good)


def test_without_presign_the_s3_hub_serves_through_its_verified_cache(s3_hub, tmp_path):
    service, http, connect = s3_hub(presign=False)
    node, weights = _weights(connect, tiny_run())
    data = service.blobs.get(weights)
    answer = http.get(f"/v1/blobs/{weights}", headers={"range": "bytes=0-99"})
    assert answer.status_code == 206 and answer.content == data[:100]
    assert (tmp_path / "home0" / "blob-cache" / weights[:2] / weights[2:4] / weights).exists()
    assert node.blob(weights) == data
    assert http.get("/healthz").json()["blobs"]["redirected"] == 0

    s3 = service.blobs.s3  # a corrupt object is never cached or served
    _, other = _weights(connect, tiny_run(name="other"))
    s3.client.put_object(Bucket=s3.bucket, Key=s3._key(other), Body=b"tampered")
    refused = http.get(f"/v1/blobs/{other}")
    assert refused.status_code == 500 and "corrupt" in refused.json()["detail"]
    assert not service.blobs.cache.has(other)


def test_a_dataset_run_on_an_s3_hub(s3_hub, tmp_path):
    """The hub imports a prepared folder into S3, memory-maps its validation shards from its
    local cache (fetched and verified), and nodes get the shards by presigned URL."""
    corpus = tmp_path / "corpus"
    manifest, digest = prepare([SHAKESPEARE], "bytes", corpus, shard_tokens=200_000)
    service, http, connect = s3_hub()
    config = tiny_run(data={"dataset": str(corpus), "slice_shards": 1})
    node, _ = _weights(connect, config)
    cache = service.blobs.cache
    assert cache.has(digest) and all(cache.has(s.sha256) for s in manifest.val)
    assert not any(cache.has(s.sha256) for s in manifest.train)  # only what the hub reads
    shard = manifest.train[0].sha256
    assert http.get(f"/v1/blobs/{shard}").status_code == 307
    assert sha256_hex(node.blob(shard)) == shard


def test_a_pushed_dataset_lands_in_s3_and_a_run_trains_on_it(s3_hub, tmp_path):
    """`gridswarm data push`'s client (datapush.push_dataset) against an S3 hub: the blobs go to
    the object store, a second push moves nothing, and a run names the dataset."""
    from gridswarm.datapush import push_dataset

    service, _, connect = s3_hub(presign=False)
    src = tmp_path / "small.txt"
    src.write_bytes(SHAKESPEARE.read_bytes()[:20_000])
    manifest, digest = prepare(
        [src], "bytes", tmp_path / "ds", shard_tokens=4096, show_progress=False
    )
    sponsor = connect(Identity.generate())
    started: list[tuple[int, int]] = []
    pushed = push_dataset(sponsor, tmp_path / "ds", lambda n, b: started.append((n, b)))
    assert pushed.dataset == f"manifest:{digest}" and pushed.blobs_sent == pushed.blobs_total
    assert started == [(pushed.blobs_sent, pushed.bytes_sent)]
    for d in [digest, *manifest.digests()]:
        assert service.blobs.s3.has(d)
    assert push_dataset(sponsor, tmp_path / "ds").blobs_sent == 0
    run_id = sponsor.create_run(tiny_run(data={"dataset": pushed.dataset})).run_id
    assert sponsor.run_status(run_id)["config"]["data"]["dataset"] == pushed.dataset
