"""system page: the node registry, the per-minute send rollup, and an index of leased outbox rows

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'nodes',
        sa.Column('id', sa.String(length=36), primary_key=True),
        sa.Column('hostname', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('roles', sa.String(length=100), nullable=False),
        sa.Column('version', sa.String(length=32), nullable=False),
        sa.Column('started_at', UTCDateTime(), nullable=False),
        sa.Column('last_heartbeat', UTCDateTime(), nullable=False),
    )
    op.create_table(
        'send_minutes',
        sa.Column('minute', sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column('shard', sa.SmallInteger(), primary_key=True, autoincrement=False),
        sa.Column('sent', sa.Integer(), nullable=False),
        sa.Column('failed', sa.Integer(), nullable=False),
    )
    op.create_index('ix_outbox_leased', 'outbox', ['priority', 'due_at'],
                    sqlite_where=sa.text('claimed_by IS NOT NULL'), postgresql_where=sa.text('claimed_by IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_outbox_leased', table_name='outbox')
    op.drop_table('send_minutes')
    op.drop_table('nodes')
