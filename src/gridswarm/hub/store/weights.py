"""The rows of pushed weights (`hub/weights.py`, `models.PushedWeights`): reads and adds on the
caller's session; the caller commits (or rolls back on a concurrent insert)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from gridswarm.hub import models as m


def pushed_weights(s: Session, sha256: str, sponsor_key: str) -> m.PushedWeights | None:
    """One identity's push of the weights blob `sha256` (by primary key), or None."""
    return s.get(m.PushedWeights, (sha256, sponsor_key))


def add_pushed_weights(s: Session, row: m.PushedWeights) -> None:
    """A new push, inserted at the caller's commit (a concurrent push of the same bytes by the
    same identity makes it an IntegrityError there)."""
    s.add(row)
