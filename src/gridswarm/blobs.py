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


class LocalBlobStore:
    """Blobs as files under `root/ab/cd/<sha256>`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / digest[:2] / digest[2:4] / digest

    def has(self, digest: str) -> bool:
        return self._path(digest).exists()

    def put(self, data: bytes, expected_digest: str | None = None) -> str:
        digest = sha256_hex(data)
        if expected_digest is not None and expected_digest != digest:
            raise BlobError(f"content hash {digest} does not match the declared {expected_digest}")
        path = self._path(digest)
        if path.exists():
            return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return digest

    @contextmanager
    def provisional(self, data: bytes) -> Iterator[str]:
        """Put `data` for a transaction run inside the `with`: if it raises (a refused or failed
        commit), the blob is removed again unless it was stored before, so a refusal leaves no
        bytes on disk."""
        digest = sha256_hex(data)
        existed = self.has(digest)
        self.put(data)
        try:
            yield digest
        except BaseException:
            if not existed:
                self._path(digest).unlink(missing_ok=True)
            raise

    def get(self, digest: str) -> bytes:
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise BlobError(f"blob {digest} not found") from exc
        if sha256_hex(data) != digest:
            raise BlobError(f"blob {digest} is corrupt on disk (hash mismatch)")
        return data
