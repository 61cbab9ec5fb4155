"""Alembic revision 0002_ledger creates exactly the table the ORM model describes."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

import gridswarm.hub
from gridswarm.db import Base
from gridswarm.hub.server import alembic
from gridswarm.identity import Identity
from gridswarm.ledger.log import Ledger

MIGRATIONS = Path(gridswarm.hub.__file__).parent / "migrations"


def test_upgrade_creates_ledger_table_matching_model(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    alembic(engine, "upgrade", "head")
    assert "ledger_entries" in inspect(engine).get_table_names()
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    ledger_diffs = [d for d in diffs if "ledger_entries" in repr(d)]
    assert ledger_diffs == []
    ledger = Ledger(engine, Identity.from_seed(b"hub"), checkpoint_every=4)
    ledger.append_many([("round", {"round": i}) for i in range(10)])
    assert ledger.verify().ok
    alembic(engine, "downgrade", "0001_core")
    assert "ledger_entries" not in inspect(engine).get_table_names()
