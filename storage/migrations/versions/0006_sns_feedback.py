"""SES feedback through SNS: the SNS messages applied (each once), and emails found by their transport id

Plain CREATE TABLE and CREATE INDEX: no row is copied.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

import storage.models

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('applied_sns_messages',
    sa.Column('message_id', sa.String(length=100), nullable=False),
    sa.Column('topic_arn', sa.String(length=300), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('received_at', storage.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('message_id')
    )
    op.create_index('ix_applied_sns_messages_received_at', 'applied_sns_messages', ['received_at'])
    op.create_index('ix_emails_transport_id', 'emails', ['transport_id'])


def downgrade() -> None:
    op.drop_index('ix_emails_transport_id', table_name='emails')
    op.drop_index('ix_applied_sns_messages_received_at', table_name='applied_sns_messages')
    op.drop_table('applied_sns_messages')
