"""sybil: the network a node first registered from, and indexes for the bounds on new node
identities (new registrations per network per hour; has a node ever worked)

Revision ID: 0009_sybil
Revises: 0007_scale
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_sybil"
down_revision = "0007_scale"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("register_net", sa.String(length=64), nullable=True))
    op.create_index("ix_nodes_register_net", "nodes", ["register_net", "registered_at"])
    op.create_index("ix_contributions_worker", "contributions", ["node_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_contributions_worker", table_name="contributions")
    op.drop_index("ix_nodes_register_net", table_name="nodes")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("register_net")
