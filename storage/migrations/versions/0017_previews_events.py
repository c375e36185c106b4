"""dashboard templates and events: template preview drafts; event indexes for one name newest first and
over a period

Revision ID: 0017
Revises: 0016

The events of one name, newest first and cursor-paged, read (project_id, name, id); the chart and the
counts of a period read (project_id, name, created_at). The first replaces (project_id, name), of which
it is an extension.
"""

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'template_drafts',
        sa.Column('id', sa.String(length=36), primary_key=True),
        sa.Column('project_id', sa.String(length=36), sa.ForeignKey('projects.id', ondelete='CASCADE'),
                  nullable=False),
        sa.Column('user_id', sa.String(length=36), sa.ForeignKey('users.id', ondelete='CASCADE'), nullable=False),
        sa.Column('subject', sa.Text(), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.Column('type', sa.String(length=16), nullable=False),
        sa.Column('style', sa.String(length=8), nullable=False),
        sa.Column('variables', sa.JSON(), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.UniqueConstraint('project_id', 'user_id'),
    )
    op.create_index('ix_template_drafts_user_id', 'template_drafts', ['user_id'])
    op.create_index('ix_events_project_id_name_id', 'events', ['project_id', 'name', 'id'])
    op.create_index('ix_events_project_id_name_created_at', 'events', ['project_id', 'name', 'created_at'])
    op.drop_index('ix_events_project_id_name', table_name='events')


def downgrade() -> None:
    op.create_index('ix_events_project_id_name', 'events', ['project_id', 'name'])
    op.drop_index('ix_events_project_id_name_created_at', table_name='events')
    op.drop_index('ix_events_project_id_name_id', table_name='events')
    op.drop_index('ix_template_drafts_user_id', table_name='template_drafts')
    op.drop_table('template_drafts')
