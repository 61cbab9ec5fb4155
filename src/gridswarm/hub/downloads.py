"""Blob downloads (`GET /v1/blobs/{digest}`): what may be served, how, and what is counted.

A published model version or delta, or a blob of a run's dataset, is served whole or by `Range`
(at most MAX_RANGE_BYTES), each blob's hash checked on disk before its first byte leaves; on an
S3 hub it is answered by a redirect to a short-lived presigned object-store URL instead
(`presigns`). Contributions, SecAgg shares and unknown digests are never served or redirected
to (404). Signed reads of versions and deltas count in the node's `bytes_down`, in memory until
the ticker writes them (`flush`); `counters` are this process's totals, shown by /healthz and
/metrics.

`HubService` builds one `Downloads` with the blob store, the presign settings, its session
factory and clock, and its own check of dataset blobs (which it keeps up to date as runs import
datasets); `hub/app.py` calls `download` and reads `counters`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from gridswarm.blobs import BlobError, FileBlobStore, PresigningStore, RangeError, byte_range
from gridswarm.hub.errors import HubError
from gridswarm.hub.store import versions as version_store
from gridswarm.protocol import Refusal

MAX_RANGE_BYTES = 64 << 20  # the most one ranged blob read serves
MAX_PUBLISHED_CACHED = 100_000  # published blob digests remembered (`_servable`)
PRESIGN_EXPIRY_S = 300  # a presigned download URL is short-lived: each range asks the hub anew


@dataclass(frozen=True)
class BlobSpan:
    """The bytes of a blob one download gets: `length` bytes from `start` of `size`."""

    path: Path
    start: int
    length: int
    size: int
    partial: bool


@dataclass(frozen=True)
class BlobRedirect:
    """A blob download answered by a redirect to `url` (a presigned object-store GET)."""

    url: str


class BlobCounters:
    """What the blob route did since the hub started (shown by /healthz): downloads the hub
    served itself (and their bytes) and downloads it redirected to the object store."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {"served": 0, "served_bytes": 0, "redirected": 0}

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, n in counts.items():
                self.counts[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)


def requested_span(range_header: str | None, size: int, max_bytes: int) -> tuple[int, int]:
    """(start, length) of a blob download: the whole blob, or the Range asked for (416 if it
    is malformed, unsatisfiable or longer than `max_bytes`)."""
    if range_header is None:
        return 0, size
    try:
        return byte_range(range_header, size, max_bytes)
    except RangeError as exc:
        raise HubError(416, str(exc), Refusal.MALFORMED) from exc


class Downloads:
    """The hub's blob downloads: the publication check, served spans and presigned redirects,
    and the per-node download counts (unwritten until `flush`)."""

    def __init__(
        self,
        blobs: FileBlobStore,
        sessions: sessionmaker[Session],
        clock: Callable[[], float],
        is_dataset_blob: Callable[[Session, str], bool],
        presign_downloads: bool,
        presign_expiry_s: int,
    ) -> None:
        """`is_dataset_blob(s, digest)`: whether `digest` is a blob of a run's dataset (the
        service's set, read through `s` when it must rescan); `presign_downloads` and
        `presign_expiry_s`: the operator's `HubSettings` of the same names."""
        self.blobs = blobs
        self.sessions = sessions
        self.clock = clock
        self._is_dataset_blob = is_dataset_blob
        self.presign_downloads = presign_downloads
        self.presign_expiry_s = presign_expiry_s
        self.counters = BlobCounters()
        self._published: dict[str, str] = {}  # digest of a published version's blob -> run
        self._downloads: list[dict] = []  # counted downloads, unwritten (`flush`)
        self._lock = threading.Lock()  # a count never lands in a batch being written
        self._verified_blobs: set[str] = set()  # blobs whose bytes were hashed since the start

    @property
    def presigns(self) -> bool:
        """Whether blob downloads are redirected to presigned object-store URLs: the blob store
        can presign (S3) and the operator did not turn it off (`--no-presign`)."""
        return self.presign_downloads and isinstance(self.blobs, PresigningStore)

    @property
    def pending(self) -> bool:
        """Whether counted downloads wait to be written (`flush`)."""
        return bool(self._downloads)

    def _servable(self, digest: str) -> str | None:
        """The run whose published version's weights or delta `digest` is, None for a dataset
        blob of a run; 404 for anything else (contributions, SecAgg shares and unknown digests
        are never served or redirected to). A published version is never withdrawn, so its
        digests are remembered: a round's thousands of delta downloads ask the database once."""
        run_id = self._published.get(digest)
        if run_id is not None:
            return run_id
        with self.sessions() as s:
            version = version_store.version_with_blob(s, digest)
            if version is None and not self._is_dataset_blob(s, digest):
                raise HubError(
                    404, f"blob {digest} is not a published model version, delta or dataset blob"
                )
        if version is None:
            return None
        if len(self._published) >= MAX_PUBLISHED_CACHED:
            self._published.clear()
        self._published[digest] = version.run_id
        return version.run_id

    def _count(self, run_id: str | None, node_id: str | None, nbytes: int, digest: str) -> None:
        """Signed reads of versions and deltas (of run `run_id`) count in the node's
        `bytes_down`."""
        if node_id is None or run_id is None:
            return
        row = {
            "run_id": run_id,
            "node_id": node_id,
            "blob": digest,
            "bytes_down": nbytes,
            "created_at": self.clock(),
        }
        with self._lock:
            self._downloads.append(row)

    def flush(self, s: Session) -> None:
        """Write the counted downloads into the transaction `s` (one executemany INSERT). A
        download is a statistic, not something acknowledged: counting it in memory and writing
        the counts with the ticker (every TICK_S) keeps a burst of downloads (every node of a
        round, woken by one batch of answers) from queueing one commit each on the database's
        write lock. A hub killed loses the counts of its last tick."""
        with self._lock:
            rows, self._downloads = self._downloads, []
        if rows:
            version_store.insert_downloads(s, rows)

    def download(
        self, digest: str, node_id: str | None, range_header: str | None
    ) -> BlobSpan | BlobRedirect:
        """What one download of a blob gets: a short-lived presigned object-store URL to
        redirect to (`presigns`), else the bytes to serve (`span`). The same publication
        check either way; a malformed or out-of-blob `Range` is refused (416) before a redirect
        too, and a redirected range counts in `bytes_down` as the length the range asks for."""
        store = self.blobs
        if not (self.presigns and isinstance(store, PresigningStore)):
            return self.span(digest, node_id, range_header)
        run_id = self._servable(digest)
        try:
            size = store.size(digest)
            url = store.presigned_get_url(digest, expires_s=self.presign_expiry_s)
        except BlobError as exc:
            raise HubError(500, str(exc), Refusal.UNAVAILABLE) from exc
        _, length = requested_span(range_header, size, size)
        self._count(run_id, node_id, length, digest)
        self.counters.add(redirected=1)
        return BlobRedirect(url)

    def span(self, digest: str, node_id: str | None, range_header: str | None) -> BlobSpan:
        """Where to read a published model version or delta, or a blob of a run's dataset
        (contributions are never served): the whole blob, or one `Range` of it (at most
        MAX_RANGE_BYTES). Each blob's hash is checked on disk before its first byte is served
        (an S3 hub reads it through its local cache, `blobcache.CachedS3Store`).
        Signed reads of versions and deltas are counted per node; dataset downloads are data,
        not synchronisation: not in `bytes_down`."""
        run_id = self._servable(digest)
        try:
            path = self.blobs.checked_path(digest, verify=digest not in self._verified_blobs)
        except BlobError as exc:
            raise HubError(500, str(exc), Refusal.UNAVAILABLE) from exc
        self._verified_blobs.add(digest)
        size = path.stat().st_size
        start, length = requested_span(range_header, size, MAX_RANGE_BYTES)
        self._count(run_id, node_id, length, digest)
        self.counters.add(served=1, served_bytes=length)
        return BlobSpan(path, start, length, size, partial=range_header is not None)
