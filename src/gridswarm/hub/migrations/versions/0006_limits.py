"""limits: a run whose work fails is isolated, with its error recorded on the run

Revision ID: 0006_limits
Revises: 0005_privacy
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_limits"
down_revision = "0005_privacy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("error")
