"""Revision 0004_trust matches the models; per-run escrow and payout addresses from the log."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

import gridswarm.hub
import gridswarm.hub.models
from gridswarm.db import Base
from gridswarm.hub.server import alembic
from gridswarm.identity import Identity
from gridswarm.ledger.balances import run_escrow
from gridswarm.ledger.log import Ledger
from gridswarm.ledger.ops import fund_claim, payout_address_claim, payout_addresses

MIGRATIONS = Path(gridswarm.hub.__file__).parent / "migrations"
TRUST_TABLES = ("trust_rounds", "node_reputation")
TRUST_COLUMNS = ("update_sha256", "claim_seq", "audit_rate", "audited", "audit_passed",
                 "loss_drop", "usefulness", "reward_units", "verdict_reason")  # fmt: skip


def test_0004_trust_creates_what_the_models_describe(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    alembic(engine, "upgrade", "head")
    tables = inspect(engine).get_table_names()
    assert all(t in tables for t in TRUST_TABLES)
    columns = {c["name"] for c in inspect(engine).get_columns("contributions")}
    assert set(TRUST_COLUMNS) <= columns
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    mine = [d for d in diffs if any(n in repr(d) for n in (*TRUST_TABLES, *TRUST_COLUMNS))]
    assert mine == []
    alembic(engine, "downgrade", "0003_energy")
    assert not set(TRUST_TABLES) & set(inspect(engine).get_table_names())
    columns = {c["name"] for c in inspect(engine).get_columns("contributions")}
    assert not set(TRUST_COLUMNS) & columns


def test_run_escrow_and_payout_addresses(ledger: Ledger) -> None:
    sponsor, node = Identity.from_seed(b"sponsor"), Identity.from_seed(b"n1")
    ledger.append_claim(fund_claim(sponsor, 900, run_id="r1", nonce="1"))
    ledger.append_claim(fund_claim(sponsor, 900, run_id="r1", nonce="2"))  # same amount, new claim
    ledger.append_claim(fund_claim(sponsor, 50, run_id="r2"))
    split = {"round": 0, "pool_units": 300, "shares": {"n1": 200, "n2": 99}, "carried_units": 1}
    ledger.append("reward", split | {"run_id": "r1"})
    ledger.append("slash", {"run_id": "r1", "account": "n2", "amount_units": 99, "reason": "x"})
    escrow = run_escrow(ledger.entries(), "r1")
    assert (escrow.funded_units, escrow.rewarded_units, escrow.forfeited_units) == (1800, 299, 99)
    assert escrow.available_units == 1600
    assert run_escrow(ledger.entries(), "r2").available_units == 50
    assert ledger.balances().available("n2") == 0
    first, second = "0x" + "11" * 20, "0x" + "22" * 20
    ledger.append_claim(payout_address_claim(node, first))
    ledger.append_claim(payout_address_claim(node, second, nonce="later"))
    ledger.append("payout_address", {"address": first})  # hub-written: not a node's word
    assert payout_addresses(ledger) == {node.node_id: second}
