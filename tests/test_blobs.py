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


def test_a_digest_the_caller_computed_is_not_computed_again(tmp_path, monkeypatch):
    """`known_sha256` (the hub's own hash of an upload, from its signature check) names the
    blob without a second pass over the bytes; `expected_digest` is still checked against it."""
    store = LocalBlobStore(tmp_path)
    data = b"an upload" * 1000
    digest = sha256_hex(data)
    monkeypatch.setattr("gridswarm.blobs.sha256_hex", lambda _: pytest.fail("hashed again"))
    assert store.put(data, known_sha256=digest) == digest
    assert store.path(digest).read_bytes() == data
    with pytest.raises(BlobError, match="does not match"):
        store.put(data, expected_digest="0" * 64, known_sha256=digest)


def test_a_new_prefix_folder_is_made_durable_in_its_parent(tmp_path, monkeypatch):
    """A blob fsynced into a folder that was just made survives a power loss only if the
    folder's own entry is fsynced too: each new prefix folder's parent is, once."""
    import gridswarm.blobs as blobs

    synced: list = []
    real = blobs._fsync_dir
    monkeypatch.setattr(blobs, "_fsync_dir", lambda path: (synced.append(path), real(path)))
    store = LocalBlobStore(tmp_path)
    digest = store.put(b"first")
    ab, abcd = tmp_path / digest[:2], tmp_path / digest[:2] / digest[2:4]
    assert synced == [tmp_path, ab, abcd]  # root gains ab/, ab/ gains cd/, cd/ gains the blob
    synced.clear()
    store.put(b"first")  # stored already: nothing written
    assert synced == []
    (abcd / digest).unlink()  # the folders stay: a blob put there again syncs only its folder
    store.put(b"first")
    assert synced == [abcd]
