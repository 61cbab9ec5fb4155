"""The S3 blob store against a real S3-compatible server (moto's standalone server on 127.0.0.1)."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from gridswarm.blobcache import KEEP_RECENT_S, CachedS3Store
from gridswarm.blobs import BlobError, open_blob_store, sha256_hex
from gridswarm.s3blobs import S3BlobStore, parse_s3_url


@pytest.fixture
def store(s3_server) -> S3BlobStore:
    blobs = open_blob_store("s3://gridswarm-test/hub-a")
    assert isinstance(blobs, S3BlobStore)
    blobs.ensure_bucket()
    return blobs


def test_put_get_has_delete_round_trip(store):
    data = b"model version bytes" * 1000
    digest = store.put(data)
    assert digest == sha256_hex(data) and store.has(digest)
    assert store.put(data) == digest  # content-addressed: a second put is a no-op
    assert store.get(digest) == data
    store.delete(digest)
    assert not store.has(digest)
    with pytest.raises(BlobError, match="not found"):
        store.get(digest)


def test_a_wrong_declared_digest_stores_nothing(store):
    with pytest.raises(BlobError, match="does not match"):
        store.put(b"abc", expected_digest="0" * 64)
    assert not store.has(sha256_hex(b"abc"))


def test_corrupt_objects_are_detected_never_served(store):
    digest = store.put(b"the real bytes")
    store.client.put_object(Bucket=store.bucket, Key=store._key(digest), Body=b"tampered")
    with pytest.raises(BlobError, match="corrupt"):
        store.get(digest)


def test_presigned_url_serves_the_blob_without_credentials(store):
    data = bytes(range(256)) * 64
    digest = store.put(data)
    url = store.presigned_get_url(digest, expires_s=60)
    got = httpx.get(url, timeout=10).content  # a plain HTTP GET, as a node would
    assert got == data and sha256_hex(got) == digest


def test_presigned_urls_name_the_nodes_endpoint_when_it_differs(store, s3_server, monkeypatch):
    """The hub reaches the store at 127.0.0.1, nodes at "localhost" (a public name, say): the
    URL is signed for the nodes' host and works there."""
    public = s3_server.replace("127.0.0.1", "localhost")
    monkeypatch.setenv("GRIDSWARM_S3_PUBLIC_ENDPOINT", public)
    hub_side = open_blob_store("s3://gridswarm-test/hub-a")
    digest = hub_side.put(b"a version for the internet")
    url = hub_side.presigned_get_url(digest, expires_s=60)
    assert url.startswith(public + "/")
    assert httpx.get(url, timeout=10).content == b"a version for the internet"
    assert hub_side.get(digest) == b"a version for the internet"  # the hub's own reads: unchanged


def test_bad_urls_and_digests_are_refused():
    with pytest.raises(ValueError):
        parse_s3_url("s3:///nobucket")
    assert parse_s3_url("s3://b/x/y/") == ("b", "x/y")
    with pytest.raises(BlobError):
        S3BlobStore("b", client=object())._key("../../etc/passwd")


def test_the_hubs_blob_cache_drops_least_recently_used_files_first(store, tmp_path):
    blob_bytes = 4096
    cached = CachedS3Store(store, tmp_path / "cache", max_bytes=int(2.5 * blob_bytes))
    digests = [store.put(bytes([i]) * blob_bytes) for i in range(4)]
    long_ago = time.time() - 10 * KEEP_RECENT_S
    paths = [cached.path(d) for d in digests[:3]]  # over the bound, but all just used: kept
    assert all(cached.cache.has(d) for d in digests[:3])
    for age, path in enumerate(paths):  # as if fetched long ago, the first least recently
        os.utime(path, (long_ago + age, long_ago + age))
    cached.path(digests[1])  # used again now: kept
    cached.path(digests[3])  # a fourth fetch prunes down to the bound
    kept = [cached.cache.has(d) for d in digests]
    assert kept == [False, True, False, True]
    assert cached.get(digests[0]) == bytes([0]) * blob_bytes  # S3 still has it
    assert cached.path(digests[0]).read_bytes() == bytes([0]) * blob_bytes  # fetched again
    with pytest.raises(ValueError, match="positive"):
        CachedS3Store(store, tmp_path / "c2", max_bytes=0)
