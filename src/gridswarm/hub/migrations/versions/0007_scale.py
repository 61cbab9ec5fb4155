"""scale: indexes for the hot paths under many nodes (live-node count, a node's place in a
round, a node's recent speed, the newest contributions of a run)

Revision ID: 0007_scale
Revises: 0008_lifecycle
"""

from alembic import op

revision = "0007_scale"
down_revision = "0008_lifecycle"  # re-chained after merging main (was 0005_privacy)
branch_labels = None
depends_on = None

INDEXES = {
    "ix_nodes_last_seen": ("nodes", ["last_seen_at"]),
    "ix_assignments_node": ("assignments", ["run_id", "round", "node_id"]),
    "ix_contributions_node": ("contributions", ["run_id", "node_id", "round"]),
    "ix_contributions_created": ("contributions", ["run_id", "created_at"]),
}


def upgrade() -> None:
    for name, (table, columns) in INDEXES.items():
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, (table, _) in INDEXES.items():
        op.drop_index(name, table_name=table)
