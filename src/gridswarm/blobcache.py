"""A hub's S3 blob store with a local, verified file cache for what the hub must read as files.

The hub keeps every blob in object storage (`S3BlobStore`), but a few of them it needs as local
files: prepared-dataset shards it memory-maps itself (validation shards for the per-round eval,
training shards for audit replays) and, when presigned downloads are turned off, the blobs it
serves in byte ranges. `CachedS3Store` is the S3 store plus a `LocalBlobStore` under the hub's
`--home`: `path(digest)` fetches the blob from S3 once, checks it against its sha256 (a corrupt
object is refused and never cached) and returns the cached file. Writes, reads and deletes go to
S3 as before, so S3 stays the one durable copy and the cache may be deleted at any time.

The cache is bounded (`max_bytes`, `gridswarm hub --blob-cache-gib`): after each fetch the least
recently used files go until it fits again, except those used in the last `KEEP_RECENT_S` (a
path just handed out may be about to be opened; a memory-mapped shard whose file is deleted
stays readable until unmapped, so pruning never breaks a reader).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from gridswarm.blobs import BlobError, LocalBlobStore
from gridswarm.s3blobs import PRESIGN_EXPIRY_S, S3BlobStore

log = logging.getLogger("gridswarm.hub")

KEEP_RECENT_S = 60.0  # files used this recently are never pruned


class CachedS3Store:
    """An `S3BlobStore` with a local verified file cache (`path`, `checked_path`), kept under
    `max_bytes` by dropping the least recently used files."""

    def __init__(self, s3: S3BlobStore, cache_dir: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"the blob cache bound must be positive, got {max_bytes} bytes")
        self.s3 = s3
        self.cache = LocalBlobStore(cache_dir)
        self.max_bytes = max_bytes
        self._fetching = threading.Lock()  # one download per blob at a time, not two racing
        self._sizes: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"CachedS3Store({self.s3!r}, cache={self.cache.root})"

    def put(
        self, data: bytes, expected_digest: str | None = None, known_sha256: str | None = None
    ) -> str:
        return self.s3.put(data, expected_digest, known_sha256)

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
            _touch(path)  # recently used: pruned last
            return path
        with self._fetching:
            if not path.exists():
                self.cache.put(self.s3.get(digest), expected_digest=digest)
                self.prune(keep=path)
        return path

    def prune(self, keep: Path | None = None, now_s: float | None = None) -> int:
        """Delete least recently used cache files until the cache holds at most `max_bytes`,
        sparing `keep` and files used in the last `KEEP_RECENT_S`; returns bytes freed."""
        now_s = time.time() if now_s is None else now_s
        files = []
        for path in self.cache.root.rglob("*"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # pruned or replaced meanwhile
                continue
            if path.is_file():
                files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        freed = 0
        for used_at, size, path in sorted(files):
            if total - freed <= self.max_bytes:
                break
            if path == keep or now_s - used_at < KEEP_RECENT_S:
                continue
            path.unlink(missing_ok=True)
            freed += size
        if freed:
            log.info("blob cache: %d bytes of least recently used blobs dropped", freed)
        return freed

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


def _touch(path: Path) -> None:
    """Mark a cached file used now (its mtime orders pruning; atime is often not kept)."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)
