"""weights: model weights sponsors pushed to start runs from (hub/weights.py)

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
        sa.Column("numel", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_pushed_weights_sponsor_key", "pushed_weights", ["sponsor_key"])


def downgrade() -> None:
    op.drop_index("ix_pushed_weights_sponsor_key", table_name="pushed_weights")
    op.drop_table("pushed_weights")
