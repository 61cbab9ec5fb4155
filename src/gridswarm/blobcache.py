"""A hub's S3 blob store with a local, verified file cache for what the hub must read as files.

The hub keeps every blob in object storage (`S3BlobStore`), but a few of them it needs as local
files: prepared-dataset shards it memory-maps itself (validation shards for the per-round eval,
training shards for audit replays) and, when presigned downloads are turned off, the blobs it
serves in byte ranges. `CachedS3Store` is the S3 store plus a `LocalBlobStore` under the hub's
`--home`: `path(digest)` fetches the blob from S3 once, checks it against its sha256 (a corrupt
object is refused and never cached) and returns the cached file. Writes, reads and deletes go to
S3 as before, so S3 stays the one durable copy and the cache may be deleted at any time.

The cache is not pruned: it holds at most the datasets of the hub's runs plus (without presigned
downloads) the versions it served.
"""

from __future__ import annotations

import threading
from pathlib import Path

from gridswarm.blobs import BlobError, LocalBlobStore
from gridswarm.s3blobs import PRESIGN_EXPIRY_S, S3BlobStore


class CachedS3Store:
    """An `S3BlobStore` with a local verified file cache (`path`, `checked_path`)."""

    def __init__(self, s3: S3BlobStore, cache_dir: Path) -> None:
        self.s3 = s3
        self.cache = LocalBlobStore(cache_dir)
        self._fetching = threading.Lock()  # one download per blob at a time, not two racing
        self._sizes: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"CachedS3Store({self.s3!r}, cache={self.cache.root})"

    def put(self, data: bytes, expected_digest: str | None = None) -> str:
        return self.s3.put(data, expected_digest)

    def get(self, digest: str) -> bytes:
        if self.cache.has(digest):
            try:
                return self.cache.get(digest)  # verified on read
            except BlobError:
                self.cache.delete(digest)  # a damaged cache file: S3 has the real bytes
        return self.s3.get(digest)

    def has(self, digest: str) -> bool:
        """In S3 (a cached copy answers without asking: it was fetched from S3 and `delete`
        removes both)."""
        return self.cache.has(digest) or self.s3.has(digest)

    def delete(self, digest: str) -> None:
        self.cache.delete(digest)
        self.s3.delete(digest)

    def size(self, digest: str) -> int:
        """The blob's length in bytes (asked of S3 once, then remembered: blobs never change)."""
        if digest not in self._sizes:
            self._sizes[digest] = self.s3.size(digest)
        return self._sizes[digest]

    def path(self, digest: str) -> Path:
        """The blob as a local file: fetched from S3 and verified (S3BlobStore.get) the first time,
        then kept in the cache. BlobError if S3 lacks it or holds other bytes under its name."""
        path = self.cache.path(digest)
        if path.exists():
            return path
        with self._fetching:
            if not path.exists():
                self.cache.put(self.s3.get(digest), expected_digest=digest)
        return path

    def checked_path(self, digest: str, verify: bool = True) -> Path:
        """As `LocalBlobStore.checked_path`, fetching the blob into the cache first."""
        self.path(digest)
        try:
            return self.cache.checked_path(digest, verify)
        except BlobError:  # the cached file was damaged on disk: fetch it again, once
            self.cache.delete(digest)
            self.path(digest)
            return self.cache.checked_path(digest, verify)

    def presigned_get_url(self, digest: str, expires_s: int = PRESIGN_EXPIRY_S) -> str:
        return self.s3.presigned_get_url(digest, expires_s)
