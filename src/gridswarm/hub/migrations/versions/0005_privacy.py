"""privacy: columns and tables for the privacy wiring of live rounds

Revision ID: 0005_privacy
Revises: 0004_trust
"""

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0005_privacy"
down_revision = "0004_trust"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Filled in by the privacy work (placeholder keeps the revision chain linear)."""


def downgrade() -> None:
    """Reverse of upgrade."""
