"""datasets: prepared datasets pushed by sponsors (their manifests and byte counts) and the
tokenizers and shards the hub checked on upload (hub/datasets.py)

Revision ID: 0010_datasets
Revises: 0009_sybil
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_datasets"
down_revision = "0009_sybil"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pushed_datasets",
        sa.Column("manifest_sha256", sa.String(length=64), primary_key=True),
        sa.Column("sponsor_key", sa.String(length=64), primary_key=True),
        sa.Column("manifest_json", sa.Text(), nullable=False),
        sa.Column("tokenizer_bytes", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("completed_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_pushed_datasets_sponsor_key", "pushed_datasets", ["sponsor_key"])
    op.create_table(
        "pushed_blobs",
        sa.Column("sha256", sa.String(length=64), primary_key=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("dtype", sa.String(length=8), nullable=True),
        sa.Column("max_id", sa.BigInteger(), nullable=True),
        sa.Column("vocab_size", sa.BigInteger(), nullable=True),
        sa.Column("eos_id", sa.BigInteger(), nullable=True),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pushed_blobs")
    op.drop_index("ix_pushed_datasets_sponsor_key", table_name="pushed_datasets")
    op.drop_table("pushed_datasets")
