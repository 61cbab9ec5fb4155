"""weights: model weights sponsors pushed to start runs from, whole or in parts (hub/weights.py)

Revision ID: 0011_weights
Revises: 0010_datasets
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_weights"
down_revision = "0010_datasets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pushed_weights",
        sa.Column("sha256", sa.String(length=64), primary_key=True),
        sa.Column("sponsor_key", sa.String(length=64), primary_key=True),
        sa.Column("numel", sa.BigInteger(), nullable=True),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("parts_json", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("completed_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_pushed_weights_sponsor_key", "pushed_weights", ["sponsor_key"])
    op.create_table(
        "pushed_weight_parts",
        sa.Column("sha256", sa.String(length=64), primary_key=True),
        sa.Column("sponsor_key", sa.String(length=64), primary_key=True),
        sa.Column("idx", sa.Integer(), primary_key=True),
        sa.Column("part_sha256", sa.String(length=64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pushed_weight_parts")
    op.drop_index("ix_pushed_weights_sponsor_key", table_name="pushed_weights")
    op.drop_table("pushed_weights")
