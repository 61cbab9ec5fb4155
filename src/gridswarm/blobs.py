"""Content-addressed blob store: bytes named by their sha256, verified on every write and read.

A blob is durable once `put` returns (written to a temporary file, fsynced, renamed into place), so
the hub can acknowledge a contribution only after its bytes are safe. Corrupt or truncated files
are detected on read and reported, never served. Large blobs are also read in byte ranges (HTTP
Range downloads, `byte_range`) and hashed in chunks, so no whole model needs to sit in memory.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RANGE = re.compile(r"^bytes=(\d{1,19})-(\d{0,19})$")
HASH_CHUNK_BYTES = 8 << 20


def synced_temp_file(folder: Path, data: bytes) -> Path:
    """`data` written and fsynced to a new file (mode 0600) in `folder`, under a temporary name:
    renaming or linking it into place afterwards is atomic, so no reader sees half of it."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        try:  # unbuffered: no file object, one write call per chunk the kernel takes
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
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


class RangeError(ValueError):
    """A Range header that is malformed or outside the blob."""


def byte_range(header: str, size: int, max_bytes: int) -> tuple[int, int]:
    """(start, length) of one `bytes=START-[END]` range of a `size`-byte blob, at most
    `max_bytes` long (a longer request is served in part: Content-Range says what came)."""
    match = _RANGE.match(header.strip())
    if match is None:
        raise RangeError(f"unsupported range {header[:80]!r}: want one 'bytes=START-[END]'")
    start = int(match[1])
    end = int(match[2]) if match[2] else size - 1
    if start >= size or end < start:
        raise RangeError(f"range {header[:80]!r} is outside the blob's {size} bytes")
    return start, min(end + 1 - start, size - start, max_bytes)


def sha256_of_file(path: Path) -> hashlib._Hash:
    """A sha256 object fed with a file's bytes, read in chunks (bounded memory); more may be
    fed to it afterwards (a download resuming past what the file holds)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks (bounded memory)."""
    return sha256_of_file(path).hexdigest()


def read_span(path: Path, start: int, length: int) -> bytes:
    """`length` bytes of a file from `start`."""
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(length)


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class BlobStore(Protocol):
    def put(self, data: bytes) -> str: ...

    def get(self, digest: str) -> bytes: ...

    def has(self, digest: str) -> bool: ...

    def delete(self, digest: str) -> None: ...


class FileBlobStore(BlobStore, Protocol):
    """A blob store that also hands out a blob as a local file, e.g. to memory-map a dataset
    shard: `LocalBlobStore`, or an S3 hub's `blobcache.CachedS3Store` (through its cache).
    `put`'s `known_sha256`: see `LocalBlobStore.put`."""

    def put(
        self, data: bytes, expected_digest: str | None = None, known_sha256: str | None = None
    ) -> str: ...

    def path(self, digest: str) -> Path: ...

    def checked_path(self, digest: str, verify: bool = True) -> Path: ...


@runtime_checkable
class PresigningStore(Protocol):
    """A blob store whose blobs a client may GET from it directly by a presigned URL (S3)."""

    def size(self, digest: str) -> int: ...

    def presigned_get_url(self, digest: str, expires_s: int = ...) -> str: ...


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
        # the prefix folders this store made or found (at most 65,536 names): `put` makes each
        # once per process, not once per blob
        self._folders: set[str] = set()

    def path(self, digest: str) -> Path:
        """Where blob `digest` lives (memory-mapped in place by prepared datasets)."""
        check_digest(digest)
        return self.root.joinpath(digest[:2], digest[2:4], digest)  # one join, not three

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def checked_path(self, digest: str, verify: bool = True) -> Path:
        """Where the blob lives; BlobError if it is missing or (`verify`) its bytes do not match
        its name (hashed in chunks)."""
        path = self.path(digest)
        if not path.exists():
            raise BlobError(f"blob {digest} not found")
        if verify and file_sha256(path) != digest:
            raise BlobError(f"blob {digest} is corrupt on disk (hash mismatch)")
        return path

    def put_file(self, source: Path, expected_digest: str) -> str:
        """Move a downloaded file into the store after checking its hash (chunked); a file that
        does not match is deleted and BlobError raised."""
        digest = file_sha256(source)
        if digest != expected_digest:
            source.unlink(missing_ok=True)
            raise BlobError(f"content hash {digest} does not match the declared {expected_digest}")
        path = self.path(digest)
        self._make_folder(digest)
        with open(source, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(source, path)
        _fsync_dir(path.parent)
        return digest

    def put(
        self, data: bytes, expected_digest: str | None = None, known_sha256: str | None = None
    ) -> str:
        """Store `data` durably (fsynced, renamed into place, folder fsynced); its digest.
        `expected_digest`: a name someone declared, checked (BlobError if it differs).
        `known_sha256`: the sha256 the caller itself computed over these very bytes (the hub,
        verifying an upload's request signature), used as is instead of hashing them again;
        never a name a client sent."""
        digest = known_sha256 if known_sha256 is not None else sha256_hex(data)
        if expected_digest is not None and expected_digest != digest:
            raise BlobError(f"content hash {digest} does not match the declared {expected_digest}")
        path = self.path(digest)
        if path.exists():
            return digest
        if digest[:4] not in self._folders:
            self._make_folder(digest)
        try:
            tmp = synced_temp_file(path.parent, data)
        except FileNotFoundError:  # the folder was removed under this process: made again
            self._make_folder(digest)
            tmp = synced_temp_file(path.parent, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return digest

    def _make_folder(self, digest: str) -> None:
        """Make `digest`'s prefix folders (`ab/`, `ab/cd/`) where missing, each one's new entry
        fsynced in its parent, so that a blob fsynced into a new folder survives a power loss
        with the folder that names it."""
        parent = self.root
        for name in (digest[:2], digest[2:4]):
            folder = parent / name
            if not folder.is_dir():
                folder.mkdir(exist_ok=True)
                _fsync_dir(parent)
            parent = folder
        self._folders.add(digest[:4])

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
