"""lifecycle: why a run is in its state and since when; node failures per run

Revision ID: 0008_lifecycle
Revises: 0005_privacy
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_lifecycle"
down_revision = "0005_privacy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("status_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("status_changed_at", sa.Float(), nullable=True))
    op.create_table(
        "run_failures",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=32), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("node_id", sa.String(length=16), sa.ForeignKey("nodes.id"), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_run_failures_run", "run_failures", ["run_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_run_failures_run", table_name="run_failures")
    op.drop_table("run_failures")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("status_changed_at")
        batch.drop_column("status_reason")
