"""The `versions` and `downloads` tables as the service reads and writes them: a run's version
rows (what an assignment starts from, what a close builds on and publishes), which published
version a blob is, and the counted downloads.

Plain functions over the caller's `Session`: none commits; the caller owns the transaction (a
close's version row commits with its round's effects and settlement, under the run's lock).
"""

from __future__ import annotations

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from gridswarm.hub import models as m


def version_row(s: Session, run_id: str, number: int) -> m.Version | None:
    """Version `number` of `run_id` (from `s`'s identity map when loaded there), None if none."""
    return s.get(m.Version, (run_id, number))


def add_version(s: Session, version: m.Version) -> None:
    """A new version's row, inserted at the caller's flush (a close: with the round's
    settlement and effects, in one commit)."""
    s.add(version)


def last_version_at(s: Session, run_id: str) -> float | None:
    """When `run_id`'s newest version was created (its last progress), None before any."""
    return s.scalar(select(func.max(m.Version.created_at)).where(m.Version.run_id == run_id))


def version_with_blob(s: Session, digest: str) -> m.Version | None:
    """A published version whose weights or delta blob is `digest`, None if none (what a
    download may be served)."""
    return s.scalars(
        select(m.Version)
        .where((m.Version.weights_blob == digest) | (m.Version.delta_blob == digest))
        .limit(1)
    ).first()


def insert_downloads(s: Session, rows: list[dict]) -> None:
    """Write counted downloads (`downloads` rows as dicts) in one executemany INSERT."""
    s.execute(insert(m.Download), rows)
