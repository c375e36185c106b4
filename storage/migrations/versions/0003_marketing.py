"""templates, segments, campaigns; outbox priority; deferred (campaign) contents

Revision ID: 0003
Revises: 0002

Columns are added with plain ALTER TABLE (no batch rebuild): rebuilding `emails` or `outbox` on SQLite
would copy every row, and dropping the old table would fire its ON DELETE CASCADEs.
"""

import sqlalchemy as sa
from alembic import op

import storage.models

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def _stamps() -> list[sa.Column]:
    return [sa.Column('created_at', storage.models.UTCDateTime(), nullable=False),
            sa.Column('updated_at', storage.models.UTCDateTime(), nullable=False)]


def upgrade() -> None:
    op.create_table('templates',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('type', sa.String(length=16), nullable=False),
    sa.Column('style', sa.String(length=8), nullable=False),
    sa.Column('from_email', sa.String(length=320), nullable=True),
    sa.Column('from_name', sa.String(length=200), nullable=True),
    sa.Column('reply_to', sa.String(length=320), nullable=True),
    *_stamps(),
    sa.CheckConstraint("type IN ('MARKETING', 'TRANSACTIONAL')", name='ck_templates_type'),
    sa.CheckConstraint("style IN ('PLUNK', 'HTML')", name='ck_templates_style'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_templates_project_id_id', 'templates', ['project_id', 'id'])
    op.create_table('segments',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('slug', sa.String(length=100), nullable=False),
    sa.Column('condition', sa.JSON(), nullable=False),
    sa.Column('track_membership', sa.Boolean(), nullable=False),
    *_stamps(),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('project_id', 'slug')
    )
    op.create_index('ix_segments_project_id_id', 'segments', ['project_id', 'id'])
    op.create_table('segment_members',
    sa.Column('segment_id', sa.String(length=36), nullable=False),
    sa.Column('contact_id', sa.String(length=36), nullable=False),
    sa.Column('entered_at', storage.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['contact_id'], ['contacts.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['segment_id'], ['segments.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('segment_id', 'contact_id')
    )
    op.create_index('ix_segment_members_contact_id', 'segment_members', ['contact_id'])
    op.create_table('campaigns',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('style', sa.String(length=8), nullable=False),
    sa.Column('template_id', sa.String(length=36), nullable=True),
    sa.Column('from_email', sa.String(length=320), nullable=True),
    sa.Column('from_name', sa.String(length=200), nullable=True),
    sa.Column('reply_to', sa.String(length=320), nullable=True),
    sa.Column('audience', sa.String(length=8), nullable=False),
    sa.Column('segment_id', sa.String(length=36), nullable=True),
    sa.Column('recipients', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=12), nullable=False),
    sa.Column('scheduled_at', storage.models.UTCDateTime(), nullable=True),
    sa.Column('started_at', storage.models.UTCDateTime(), nullable=True),
    sa.Column('finished_at', storage.models.UTCDateTime(), nullable=True),
    sa.Column('content_id', sa.String(length=36), nullable=True),
    sa.Column('fanout_cursor', sa.String(length=36), nullable=True),
    sa.Column('fanout_done', sa.Boolean(), nullable=False),
    sa.Column('recipient_count', sa.Integer(), nullable=False),
    *_stamps(),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['segment_id'], ['segments.id']),
    sa.ForeignKeyConstraint(['template_id'], ['templates.id']),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_campaigns_project_id_id', 'campaigns', ['project_id', 'id'])
    op.create_index('ix_campaigns_status_scheduled_at', 'campaigns', ['status', 'scheduled_at'])
    op.add_column('contents', sa.Column('deferred', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column('emails', sa.Column('campaign_id', sa.String(length=36), nullable=True))
    op.create_index('uq_emails_campaign_contact', 'emails', ['campaign_id', 'contact_id'], unique=True)
    op.add_column('outbox', sa.Column('priority', sa.SmallInteger(), server_default=sa.text('0'), nullable=False))
    op.add_column('outbox', sa.Column('campaign_id', sa.String(length=36), nullable=True))
    op.drop_index('ix_outbox_due_at', table_name='outbox')
    op.create_index('ix_outbox_priority_due_at', 'outbox', ['priority', 'due_at'])
    op.create_index('ix_outbox_campaign_id', 'outbox', ['campaign_id'])
    op.create_index('ix_events_email_id', 'events', ['email_id'])


def downgrade() -> None:
    op.drop_index('ix_events_email_id', table_name='events')
    op.drop_index('ix_outbox_campaign_id', table_name='outbox')
    op.drop_index('ix_outbox_priority_due_at', table_name='outbox')
    op.create_index('ix_outbox_due_at', 'outbox', ['due_at'])
    with op.batch_alter_table('outbox') as batch_op:
        batch_op.drop_column('campaign_id')
        batch_op.drop_column('priority')
    op.drop_index('uq_emails_campaign_contact', table_name='emails')
    with op.batch_alter_table('emails') as batch_op:
        batch_op.drop_column('campaign_id')
    with op.batch_alter_table('contents') as batch_op:
        batch_op.drop_column('deferred')
    op.drop_table('campaigns')
    op.drop_table('segment_members')
    op.drop_table('segments')
    op.drop_table('templates')
