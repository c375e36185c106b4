"""reputation counters and state, domain re-checks, parked outbox rows

Revision ID: 0023
Revises: 0020

Issue 25 items 3 and 4. `reputation_days` counts a project's sends, hard bounces and complaints per day
(sharded), `reputation_states` keeps where its rates stood; `domains.checked_at` / `held_since` drive the
periodic re-check and the hold of mail whose DKIM record vanished; `outbox.hold` says why a row is parked
(DKIM or PAUSED), with a partial index for the held-mail gauge and the releases.
"""

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = '0023'
down_revision = '0022'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'reputation_days',
        sa.Column('project_id', sa.String(length=36), sa.ForeignKey('projects.id', ondelete='CASCADE'),
                  primary_key=True),
        sa.Column('day', sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column('shard', sa.SmallInteger(), primary_key=True, autoincrement=False),
        sa.Column('sent', sa.Integer(), nullable=False),
        sa.Column('bounced', sa.Integer(), nullable=False),
        sa.Column('complained', sa.Integer(), nullable=False),
    )
    op.create_table(
        'reputation_states',
        sa.Column('project_id', sa.String(length=36), sa.ForeignKey('projects.id', ondelete='CASCADE'),
                  primary_key=True),
        sa.Column('bounce_level', sa.String(length=8), nullable=False),
        sa.Column('complaint_level', sa.String(length=8), nullable=False),
        sa.Column('marketing_paused', sa.Boolean(), nullable=False),
        sa.Column('updated_at', UTCDateTime(), nullable=False),
    )
    op.add_column('domains', sa.Column('checked_at', UTCDateTime(), nullable=True))
    op.add_column('domains', sa.Column('held_since', UTCDateTime(), nullable=True))
    op.create_index('ix_domains_checked_at', 'domains', ['checked_at'])
    op.add_column('outbox', sa.Column('hold', sa.String(length=16), nullable=True))
    op.create_index('ix_outbox_hold', 'outbox', ['hold'], sqlite_where=sa.text('hold IS NOT NULL'),
                    postgresql_where=sa.text('hold IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_outbox_hold', table_name='outbox')
    with op.batch_alter_table('outbox') as batch:
        batch.drop_column('hold')
    op.drop_index('ix_domains_checked_at', table_name='domains')
    with op.batch_alter_table('domains') as batch:
        batch.drop_column('held_since')
        batch.drop_column('checked_at')
    op.drop_table('reputation_states')
    op.drop_table('reputation_days')
