"""template preview drafts: the newest few per user and project instead of one

Revision ID: 0020
Revises: 0019

The editor posts a preview as the user types; the requests overlap, and a frame loading the draft before
the newest found it replaced (a 404 in the frame). `storage.templates.save_draft` now keeps the newest
four, so the unique (project_id, user_id) gives way to an index on (project_id, user_id, id). Drafts are
disposable (the editor makes a new one at the next keystroke): the table is made again, without a table
rebuild on SQLite.
"""

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None


def _drafts_table(*constraints: sa.schema.SchemaItem) -> None:
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
        *constraints,
    )
    op.create_index('ix_template_drafts_user_id', 'template_drafts', ['user_id'])


def upgrade() -> None:
    op.drop_index('ix_template_drafts_user_id', table_name='template_drafts')
    op.drop_table('template_drafts')
    _drafts_table()
    op.create_index('ix_template_drafts_project_id_user_id_id', 'template_drafts', ['project_id', 'user_id', 'id'])


def downgrade() -> None:
    op.drop_index('ix_template_drafts_project_id_user_id_id', table_name='template_drafts')
    op.drop_index('ix_template_drafts_user_id', table_name='template_drafts')
    op.drop_table('template_drafts')
    _drafts_table(sa.UniqueConstraint('project_id', 'user_id'))
