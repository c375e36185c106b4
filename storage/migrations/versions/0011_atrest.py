"""webhook secrets sealed at rest: longer than the 100 characters their columns allowed

Revision ID: 0011
Revises: 0010

PostgreSQL enforces VARCHAR(100); a sealed secret is about 120 characters. SQLite enforces no length, and
changing a column's type there means rebuilding the table, whose DROP would cascade to the webhook
deliveries (foreign keys are on): its tables keep VARCHAR(100) (see `storage.secrets.EncryptedText`).
"""

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for name, nullable in (('secret', False), ('previous_secret', True)):
        op.alter_column('webhook_endpoints', name, type_=sa.Text(), existing_type=sa.String(length=100),
                        existing_nullable=nullable)


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for name, nullable in (('secret', False), ('previous_secret', True)):
        op.alter_column('webhook_endpoints', name, type_=sa.String(length=100), existing_type=sa.Text(),
                        existing_nullable=nullable)
