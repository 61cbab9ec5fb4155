"""trust: columns and tables for the trust wiring of live rounds

Revision ID: 0004_trust
Revises: 0003_energy
"""

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0004_trust"
down_revision = "0003_energy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Filled in by the trust work (placeholder keeps the revision chain linear)."""


def downgrade() -> None:
    """Reverse of upgrade."""
