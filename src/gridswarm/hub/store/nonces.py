"""The `nonces` table: nonces of accepted signed requests (a second use is a replay), written by
`hub/nonces.py` `NonceBook`'s group commit on a bare connection (no ORM on this path, which every
signed request takes).

Plain functions over the caller's `Connection`: none commits; `NonceBook` commits each batch,
rolls back a batch that hit a stored nonce (the primary key), and prunes.
"""

from __future__ import annotations

from sqlalchemy import Connection, delete, insert

from gridswarm.hub import models as m


def insert_nonces(conn: Connection, rows: dict | list[dict]) -> None:
    """Insert one `nonces` row (a dict) or many (a list: one Core executemany INSERT); a nonce
    stored before raises `IntegrityError` (its primary key)."""
    conn.execute(insert(m.Nonce.__table__), rows)


def prune_nonces(conn: Connection, before: float) -> None:
    """Delete the nonces seen before `before` (older ones can never be accepted again)."""
    table = m.Nonce.__table__
    conn.execute(delete(table).where(table.c.seen_at < before))
