import pytest

from gridswarm.blobs import BlobError, LocalBlobStore, sha256_hex


def test_put_get_by_hash(tmp_path):
    store = LocalBlobStore(tmp_path)
    digest = store.put(b"hello")
    assert digest == sha256_hex(b"hello")
    assert store.get(digest) == b"hello"
    assert store.put(b"hello") == digest  # idempotent


def test_declared_hash_must_match(tmp_path):
    with pytest.raises(BlobError, match="does not match"):
        LocalBlobStore(tmp_path).put(b"x", expected_digest="0" * 64)


def test_corrupt_blob_is_detected_not_served(tmp_path):
    store = LocalBlobStore(tmp_path)
    digest = store.put(b"precious bytes")
    path = next(p for p in tmp_path.rglob(digest))
    path.write_bytes(b"precious bytez")
    with pytest.raises(BlobError, match="corrupt"):
        store.get(digest)


def test_bad_names_and_missing_blobs(tmp_path):
    store = LocalBlobStore(tmp_path)
    with pytest.raises(BlobError, match="not a sha256"):
        store.get("../../etc/passwd")
    with pytest.raises(BlobError, match="not found"):
        store.get("a" * 64)
