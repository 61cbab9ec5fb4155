"""ledger: the embedded append-only, hash-chained, signed log

Revision ID: 0002_ledger
Revises: 0001_core
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_ledger"
down_revision = "0001_core"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ledger_entries",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("payload_json", sa.Text(), nullable=False),
        sa.Column("author", sa.LargeBinary(length=32), nullable=False),
        sa.Column("prev_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("entry_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("signature", sa.LargeBinary(length=64), nullable=False),
        sa.Column("scope", sa.SmallInteger(), nullable=False),
        sa.Column("claim_digest", sa.LargeBinary(length=32), nullable=True),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_ledger_entries"),
        sa.UniqueConstraint("prev_hash", name="uq_ledger_entries_prev_hash"),
        sa.UniqueConstraint("entry_hash", name="uq_ledger_entries_entry_hash"),
        sa.UniqueConstraint("claim_digest", name="uq_ledger_entries_claim_digest"),
    )
    op.create_index("ix_ledger_entries_kind", "ledger_entries", ["kind"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_ledger_entries_kind", table_name="ledger_entries")
    op.drop_table("ledger_entries")
