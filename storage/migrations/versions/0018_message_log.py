"""the message log and suppressions pages: email indexes per filter, suppressions newest first and their cause

Revision ID: 0018
Revises: 0017

`emails` gets one (project_id, <filter>, id) index per indexed filter of the message log, so each filter is
an index range already in newest-first order; the status one carries the source too, so a status and a
source together are checked on the index entries alone. `suppressions.email_id` names the email whose bounce or
complaint suppressed the address. Plain ADD COLUMN / CREATE INDEX: no table rebuild on SQLite.
"""

import sqlalchemy as sa
from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_emails_project_id_recipient_id', 'emails', ['project_id', 'recipient', 'id'])
    op.create_index('ix_emails_project_id_status_id_source', 'emails', ['project_id', 'status', 'id', 'source'])
    op.create_index('ix_emails_project_id_source_id', 'emails', ['project_id', 'source', 'id'])
    op.add_column('suppressions', sa.Column('email_id', sa.String(length=36), nullable=True))
    op.create_index('ix_suppressions_project_id_id', 'suppressions', ['project_id', 'id'])


def downgrade() -> None:
    op.drop_index('ix_suppressions_project_id_id', table_name='suppressions')
    with op.batch_alter_table('suppressions', schema=None) as batch_op:
        batch_op.drop_column('email_id')
    op.drop_index('ix_emails_project_id_source_id', table_name='emails')
    op.drop_index('ix_emails_project_id_status_id_source', table_name='emails')
    op.drop_index('ix_emails_project_id_recipient_id', table_name='emails')
