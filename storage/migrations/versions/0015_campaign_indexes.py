"""dashboard campaigns: a campaign's emails counted by state, and paged newest first (of one state or all), from indexes

Revision ID: 0015
Revises: 0014
"""

from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_emails_campaign_id_status_id_sent_at', 'emails', ['campaign_id', 'status', 'id', 'sent_at'])
    op.create_index('ix_emails_campaign_id_id', 'emails', ['campaign_id', 'id'])


def downgrade() -> None:
    op.drop_index('ix_emails_campaign_id_id', 'emails')
    op.drop_index('ix_emails_campaign_id_status_id_sent_at', 'emails')
