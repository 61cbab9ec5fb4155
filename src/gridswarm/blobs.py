"""Content-addressed blob store: bytes named by their sha256, verified on every write and read.

A blob is durable once `put` returns (written to a temporary file, fsynced, renamed into place), so
the hub can acknowledge a contribution only after its bytes are safe. Corrupt or truncated files
are detected on read and reported, never served.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def synced_temp_file(folder: Path, data: bytes) -> Path:
    """`data` written and fsynced to a new file (mode 0600) in `folder`, under a temporary name:
    renaming or linking it into place afterwards is atomic, so no reader sees half of it."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


class BlobError(Exception):
    """A blob is missing, or its bytes do not match its name."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    if not _SHA256.match(digest):
        raise BlobError(f"not a sha256 hex digest: {digest[:80]!r}")
    return digest


class BlobStore(Protocol):
    def put(self, data: bytes) -> str: ...

    def get(self, digest: str) -> bytes: ...

    def has(self, digest: str) -> bool: ...

    def delete(self, digest: str) -> None: ...


@contextmanager
def provisional(store: BlobStore, data: bytes) -> Iterator[str]:
    """Put `data` for a transaction run inside the `with`: if it raises (a refused or failed
    commit), the blob is removed again unless it was stored before, so a refusal leaves no
    bytes behind."""
    digest = sha256_hex(data)
    existed = store.has(digest)
    store.put(data)
    try:
        yield digest
    except BaseException:
        if not existed:
            store.delete(digest)
        raise


class LocalBlobStore:
    """Blobs as files under `root/ab/cd/<sha256>`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where blob `digest` lives (memory-mapped in place by prepared datasets)."""
        check_digest(digest)
        return self.root / digest[:2] / digest[2:4] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def put(self, data: bytes, expected_digest: str | None = None) -> str:
        digest = sha256_hex(data)
        if expected_digest is not None and expected_digest != digest:
            raise BlobError(f"content hash {digest} does not match the declared {expected_digest}")
        path = self.path(digest)
        if path.exists():
            return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = synced_temp_file(path.parent, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return digest

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def get(self, digest: str) -> bytes:
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise BlobError(f"blob {digest} not found") from exc
        if sha256_hex(data) != digest:
            raise BlobError(f"blob {digest} is corrupt on disk (hash mismatch)")
        return data


def open_blob_store(where: str | Path) -> BlobStore:
    """The store named by `--blobs`: `s3://bucket/prefix` (S3-compatible object storage, settings
    from the standard AWS environment variables) or a local folder."""
    if str(where).startswith("s3://"):
        from gridswarm.s3blobs import S3BlobStore  # boto3 only when asked for

        return S3BlobStore.from_url(str(where))
    return LocalBlobStore(Path(where))
