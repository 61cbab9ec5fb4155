"""privacy: DP accounting per round, privacy stops, SecAgg sessions and stage messages

Revision ID: 0005_privacy
Revises: 0004_trust
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_privacy"
down_revision = "0004_trust"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "privacy_rounds",
        sa.Column("run_id", sa.String(length=32), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("clip_norm", sa.Float(), nullable=False),
        sa.Column("nodes", sa.Integer(), nullable=False),
        sa.Column("clipped", sa.Integer(), nullable=True),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "round"),
    )
    op.create_table(
        "privacy_runs",
        sa.Column("run_id", sa.String(length=32), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("stop_reason", sa.Text(), nullable=False),
        sa.Column("stopped_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("run_id"),
    )
    op.create_table(
        "secagg_sessions",
        sa.Column("run_id", sa.String(length=32), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("stage_deadline_at", sa.Float(), nullable=False),
        sa.Column("opened_at", sa.Float(), nullable=False),
        sa.Column("closed_at", sa.Float(), nullable=True),
        sa.Column("survivors", sa.Integer(), nullable=True),
        sa.Column("dropped", sa.Integer(), nullable=True),
        sa.Column("sum_blob", sa.String(length=64), nullable=True),
        sa.Column("aggregate_blob", sa.String(length=64), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_failure", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "round"),
    )
    op.create_table(
        "secagg_messages",
        sa.Column("run_id", sa.String(length=32), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("node_id", sa.String(length=16), sa.ForeignKey("nodes.id"), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "round", "stage", "node_id"),
    )


def downgrade() -> None:
    op.drop_table("secagg_messages")
    op.drop_table("secagg_sessions")
    op.drop_table("privacy_runs")
    op.drop_table("privacy_rounds")
