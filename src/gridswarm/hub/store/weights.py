"""The rows of pushed weights (`hub/weights.py`, `models.PushedWeights`) and of their parts
(`models.PushedWeightPart`): reads and adds on the caller's session; the caller commits (or
rolls back on a concurrent insert)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from gridswarm.hub import models as m


def pushed_weights(s: Session, sha256: str, sponsor_key: str) -> m.PushedWeights | None:
    """One identity's push of the weights blob `sha256` (by primary key), or None."""
    return s.get(m.PushedWeights, (sha256, sponsor_key))


def add_pushed_weights(s: Session, row: m.PushedWeights) -> None:
    """A new push, inserted at the caller's commit (a concurrent push of the same bytes by the
    same identity makes it an IntegrityError there)."""
    s.add(row)


def offered_weights_json(s: Session, sha256: str) -> str | None:
    """The `WeightsOffer` (JSON) of any identity's offer of `sha256` in parts; None if none."""
    return s.scalar(
        select(m.PushedWeights.parts_json)
        .where(m.PushedWeights.sha256 == sha256, m.PushedWeights.parts_json.is_not(None))
        .limit(1)
    )


def received_parts(s: Session, sha256: str, sponsor_key: str) -> dict[int, str]:
    """The parts of `sha256` this identity uploaded: their sha256 by index."""
    rows = s.execute(
        select(m.PushedWeightPart.idx, m.PushedWeightPart.part_sha256).where(
            m.PushedWeightPart.sha256 == sha256, m.PushedWeightPart.sponsor_key == sponsor_key
        )
    )
    return {int(idx): digest for idx, digest in rows}


def add_part(s: Session, row: m.PushedWeightPart) -> None:
    """A received part, inserted at the caller's commit (IntegrityError there on a repeat)."""
    s.add(row)
