"""The rows of pushed datasets (`hub/datasets.py`): sponsors' offers (`models.PushedDataset`)
and the blobs the hub checked on upload (`models.PushedBlob`), and the bytes all pushes count
against the quota (pushed weights' too). Reads and adds on the caller's
session; the caller commits (or rolls back on a concurrent insert)."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gridswarm.hub import models as m

IN_QUERY = 500  # digests per `IN (...)` (well under SQLite's bound-parameter limit)


def pushed_dataset(s: Session, manifest_sha256: str, sponsor_key: str) -> m.PushedDataset | None:
    """One identity's offer of a manifest (by primary key: the session's identity map first)."""
    return s.get(m.PushedDataset, (manifest_sha256, sponsor_key))


def add_pushed_dataset(s: Session, row: m.PushedDataset) -> None:
    """A new offer, inserted at the caller's commit."""
    s.add(row)


def offered_bytes(s: Session, sponsor_key: str) -> tuple[int, int]:
    """(bytes this identity's pushes were allowed, bytes all pushes were allowed): pushed
    datasets' offers and pushed weights (hub/weights.py) share one quota and one cap."""
    identity, everyone = 0, 0
    for table in (m.PushedDataset, m.PushedWeights):
        total = func.coalesce(func.sum(table.bytes), 0)
        identity += int(s.scalar(select(total).where(table.sponsor_key == sponsor_key)) or 0)
        everyone += int(s.scalar(select(total)) or 0)
    return identity, everyone


def pushed_blobs(s: Session, digests: list[str]) -> Iterator[m.PushedBlob]:
    """The noted blobs among `digests`, one `IN` query per IN_QUERY of them, each sent when
    the previous one's rows have been consumed."""
    for i in range(0, len(digests), IN_QUERY):
        yield from s.scalars(
            select(m.PushedBlob).where(m.PushedBlob.sha256.in_(digests[i : i + IN_QUERY]))
        )


def offered_manifest_json(s: Session, manifest_sha256: str) -> str | None:
    """The manifest (JSON) of an offer of `manifest_sha256` by any identity; None if none."""
    return s.scalar(
        select(m.PushedDataset.manifest_json)
        .where(m.PushedDataset.manifest_sha256 == manifest_sha256)
        .limit(1)
    )


def offered_tokenizer_bytes(s: Session, manifest_sha256: str) -> int | None:
    """The largest tokenizer size any offer of `manifest_sha256` gave; None if none."""
    return s.scalar(
        select(func.max(m.PushedDataset.tokenizer_bytes)).where(
            m.PushedDataset.manifest_sha256 == manifest_sha256
        )
    )


def pushed_blob(s: Session, sha256: str) -> m.PushedBlob | None:
    """The note of a checked blob (by primary key), or None."""
    return s.get(m.PushedBlob, sha256)


def add_pushed_blob(s: Session, row: m.PushedBlob) -> None:
    """A newly checked blob's note, inserted at the caller's commit (a concurrent upload of the
    same bytes makes it an IntegrityError there)."""
    s.add(row)
