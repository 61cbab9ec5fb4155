"""hub/store/datasets.py on a migrated database: the noted blobs of a manifest with more digests
than one `IN (...)` takes are read in IN_QUERY-sized queries, and all of them are found."""

from __future__ import annotations

import hashlib

from sqlalchemy import create_engine, event
from sqlalchemy.orm import Session

from gridswarm.hub import models as m
from gridswarm.hub.server import migrate
from gridswarm.hub.store.datasets import IN_QUERY, add_pushed_blob, pushed_blob, pushed_blobs


def digest(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_pushed_blobs_reads_in_chunks_and_finds_every_noted_one(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    migrate(engine)
    noted = [digest(i) for i in range(2 * IN_QUERY + 100)]
    with Session(engine) as s:
        for sha in noted:
            add_pushed_blob(
                s, m.PushedBlob(sha256=sha, kind="shard", dtype="u16", bytes=2, created_at=0.0)
            )
        s.commit()
    wanted = sorted(noted[IN_QUERY // 2 :] + [digest(-i) for i in range(1, 51)])  # 50 unknown
    selects: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _count(_conn, _cursor, statement, *_args) -> None:
        if "FROM pushed_blobs" in statement:
            selects.append(statement)

    with Session(engine) as s:
        found = {row.sha256 for row in pushed_blobs(s, wanted)}
        assert pushed_blob(s, noted[0]) is not None and pushed_blob(s, digest(-1)) is None
    assert found == set(noted[IN_QUERY // 2 :])
    assert len(selects) == -(-len(wanted) // IN_QUERY) + 2  # the chunks, then the two gets
