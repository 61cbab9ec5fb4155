"""trust: columns and tables for the trust wiring of live rounds

Verification results on each contribution, the per-round audit seed (committed on the ledger when
the round opens, revealed when it closes) and each node's reputation.

Revision ID: 0004_trust
Revises: 0003_energy
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_trust"
down_revision = "0003_energy"
branch_labels = None
depends_on = None

CONTRIBUTION_COLUMNS = (
    ("update_sha256", sa.String(length=64)),
    ("claim_seq", sa.BigInteger()),
    ("audit_rate", sa.Float()),
    ("audited", sa.Boolean()),
    ("audit_passed", sa.Boolean()),
    ("loss_drop", sa.Float()),
    ("usefulness", sa.Float()),
    ("reward_units", sa.BigInteger()),
    ("verdict_reason", sa.Text()),
)


def upgrade() -> None:
    for name, kind in CONTRIBUTION_COLUMNS:
        op.add_column("contributions", sa.Column(name, kind, nullable=True))
    op.create_index(
        "ix_contributions_update_sha256", "contributions", ["update_sha256"], unique=False
    )
    op.create_table(
        "trust_rounds",
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("audit_seed", sa.String(length=64), nullable=False),
        sa.Column("commitment", sa.String(length=64), nullable=False),
        sa.Column("opened_at", sa.Float(), nullable=False),
        sa.Column("revealed_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"]),
        sa.PrimaryKeyConstraint("run_id", "round"),
    )
    op.create_table(
        "node_reputation",
        sa.Column("node_id", sa.String(length=16), nullable=False),
        sa.Column("consecutive_valid", sa.Integer(), nullable=False),
        sa.Column("audits_passed", sa.Integer(), nullable=False),
        sa.Column("audits_failed", sa.Integer(), nullable=False),
        sa.Column("strikes", sa.Integer(), nullable=False),
        sa.Column("liveness", sa.Float(), nullable=False),
        sa.Column("usefulness", sa.Float(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"]),
        sa.PrimaryKeyConstraint("node_id"),
    )


def downgrade() -> None:
    op.drop_table("node_reputation")
    op.drop_table("trust_rounds")
    op.drop_index("ix_contributions_update_sha256", table_name="contributions")
    with op.batch_alter_table("contributions") as batch:
        for name, _ in reversed(CONTRIBUTION_COLUMNS):
            batch.drop_column(name)
