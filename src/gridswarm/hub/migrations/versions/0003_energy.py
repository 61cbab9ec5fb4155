"""energy: columns and tables for the energy wiring of live rounds

Revision ID: 0003_energy
Revises: 0002_ledger
"""

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0003_energy"
down_revision = "0002_ledger"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Filled in by the energy work (placeholder keeps the revision chain linear)."""


def downgrade() -> None:
    """Reverse of upgrade."""
