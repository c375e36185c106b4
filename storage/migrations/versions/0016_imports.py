"""dashboard contacts: import jobs, and the indexes the contact pages read by

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_contacts_project_id_subscribed_id', 'contacts', ['project_id', 'subscribed', 'id'])
    op.create_index('ix_contacts_project_id_email_prefix', 'contacts', ['project_id', 'email'],
                    postgresql_ops={'email': 'COLLATE "C"'})
    op.create_index('ix_events_contact_id_id', 'events', ['contact_id', 'id'])
    op.create_index('ix_emails_contact_id_id', 'emails', ['contact_id', 'id'])
    op.create_table(
        'import_jobs',
        sa.Column('id', sa.String(length=36), primary_key=True),
        sa.Column('project_id', sa.String(length=36), sa.ForeignKey('projects.id', ondelete='CASCADE'),
                  nullable=False),
        sa.Column('filename', sa.String(length=255), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('columns', sa.JSON(), nullable=False),
        sa.Column('mapping', sa.JSON(), nullable=False),
        sa.Column('total', sa.Integer(), nullable=False),
        sa.Column('processed', sa.Integer(), nullable=False),
        sa.Column('created', sa.Integer(), nullable=False),
        sa.Column('updated', sa.Integer(), nullable=False),
        sa.Column('failed', sa.Integer(), nullable=False),
        sa.Column('failures', sa.JSON(), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('created_by', sa.String(length=36), nullable=True),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('heartbeat_at', UTCDateTime(), nullable=False),
        sa.Column('finished_at', UTCDateTime(), nullable=True),
    )
    op.create_index('ix_import_jobs_project_id_id', 'import_jobs', ['project_id', 'id'])
    op.create_index('ix_import_jobs_state', 'import_jobs', ['state'])


def downgrade() -> None:
    op.drop_table('import_jobs')
    op.drop_index('ix_emails_contact_id_id', 'emails')
    op.drop_index('ix_events_contact_id_id', 'events')
    op.drop_index('ix_contacts_project_id_email_prefix', 'contacts')
    op.drop_index('ix_contacts_project_id_subscribed_id', 'contacts')
