"""energy: a node's last energy report; carbon accounting of each contribution

Revision ID: 0003_energy
Revises: 0002_ledger
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_energy"
down_revision = "0002_ledger"
branch_labels = None
depends_on = None

CONTRIBUTION_COLUMNS = (
    ("intensity_g_per_kwh", sa.Float()),
    ("intensity_source", sa.String(length=16)),
    ("emissions_g", sa.Float()),
    ("local_surplus_share", sa.Float()),
)


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("energy_json", sa.Text(), nullable=True))
    with op.batch_alter_table("contributions") as batch:
        for name, kind in CONTRIBUTION_COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("contributions") as batch:
        for name, _ in reversed(CONTRIBUTION_COLUMNS):
            batch.drop_column(name)
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("energy_json")
