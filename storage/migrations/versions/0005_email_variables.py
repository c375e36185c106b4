"""emails.variables: a deferred email's own template variables (a workflow run's event and step data)

A plain ALTER TABLE … ADD COLUMN: no row is copied.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('emails', sa.Column('variables', sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column('emails', 'variables')
