"""inbound routes and the routed messages they receive (issue 25 item 2)

Revision ID: 0022
Revises: 0020

New tables only: `inbound_routes` (pattern → project, on one of its domains), `inbound_messages` (the raw
message of each `email.received`) and `inbound_attachments` (each attachment decoded).
"""

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'inbound_routes',
        sa.Column('id', sa.String(length=36), primary_key=True),
        sa.Column('project_id', sa.String(length=36), sa.ForeignKey('projects.id', ondelete='CASCADE'),
                  nullable=False),
        sa.Column('domain_id', sa.String(length=36), sa.ForeignKey('domains.id', ondelete='CASCADE'),
                  nullable=False),
        sa.Column('pattern', sa.String(length=320), nullable=False, unique=True),
        sa.Column('created_at', UTCDateTime(), nullable=False),
    )
    op.create_index('ix_inbound_routes_project_id_id', 'inbound_routes', ['project_id', 'id'])
    op.create_index('ix_inbound_routes_domain_id', 'inbound_routes', ['domain_id'])
    op.create_table(
        'inbound_messages',
        sa.Column('id', sa.String(length=36), primary_key=True),
        sa.Column('project_id', sa.String(length=36), sa.ForeignKey('projects.id', ondelete='CASCADE'),
                  nullable=False),
        sa.Column('route_id', sa.String(length=36), nullable=True),
        sa.Column('event_id', sa.String(length=36), nullable=True),
        sa.Column('envelope_from', sa.String(length=320), nullable=False),
        sa.Column('recipient', sa.String(length=320), nullable=False),
        sa.Column('client_ip', sa.String(length=64), nullable=False),
        sa.Column('helo', sa.String(length=255), nullable=False),
        sa.Column('raw', sa.LargeBinary(), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
    )
    op.create_index('ix_inbound_messages_project_id_id', 'inbound_messages', ['project_id', 'id'])
    op.create_table(
        'inbound_attachments',
        sa.Column('id', sa.String(length=36), primary_key=True),
        sa.Column('message_id', sa.String(length=36), sa.ForeignKey('inbound_messages.id', ondelete='CASCADE'),
                  nullable=False),
        sa.Column('filename', sa.String(length=255), nullable=False),
        sa.Column('content_type', sa.String(length=255), nullable=False),
        sa.Column('size', sa.Integer(), nullable=False),
        sa.Column('data', sa.LargeBinary(), nullable=False),
    )
    op.create_index('ix_inbound_attachments_message_id', 'inbound_attachments', ['message_id'])


def downgrade() -> None:
    op.drop_index('ix_inbound_attachments_message_id', table_name='inbound_attachments')
    op.drop_table('inbound_attachments')
    op.drop_index('ix_inbound_messages_project_id_id', table_name='inbound_messages')
    op.drop_table('inbound_messages')
    op.drop_index('ix_inbound_routes_domain_id', table_name='inbound_routes')
    op.drop_index('ix_inbound_routes_project_id_id', table_name='inbound_routes')
    op.drop_table('inbound_routes')
