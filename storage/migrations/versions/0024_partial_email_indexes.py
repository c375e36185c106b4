"""emails and outbox: the campaign and transport-id indexes hold only the rows they find

Revision ID: 0024
Revises: 0023

Transactional mail (the API, SMTP) has no campaign, and no email has a transport id until it is sent: the
four indexes that lead with campaign_id (three on emails, one on the outbox) and the one on transport_id held
an entry for each such NULL, written with every accepted message and with every campaign recipient queued.
Every query on them asks for one campaign or one transport id, which implies the column is set, so each
becomes partial (the unique one still arbitrates the fan-out's ON CONFLICT, with the same predicate).
"""

import sqlalchemy as sa
from alembic import op

revision = '0024'
down_revision = '0023'
branch_labels = None
depends_on = None

PARTIAL = [
    ('emails', 'uq_emails_campaign_contact', ['campaign_id', 'contact_id'], True, 'campaign_id IS NOT NULL'),
    ('emails', 'ix_emails_campaign_id_status_id_sent_at', ['campaign_id', 'status', 'id', 'sent_at'], False,
     'campaign_id IS NOT NULL'),
    ('emails', 'ix_emails_campaign_id_id', ['campaign_id', 'id'], False, 'campaign_id IS NOT NULL'),
    ('emails', 'ix_emails_transport_id', ['transport_id'], False, 'transport_id IS NOT NULL'),
    ('outbox', 'ix_outbox_campaign_id', ['campaign_id'], False, 'campaign_id IS NOT NULL'),
]


def upgrade() -> None:
    for table, name, columns, unique, where in PARTIAL:
        op.drop_index(name, table_name=table)
        op.create_index(name, table, columns, unique=unique, sqlite_where=sa.text(where),
                        postgresql_where=sa.text(where))


def downgrade() -> None:
    for table, name, columns, unique, _ in PARTIAL:
        op.drop_index(name, table_name=table)
        op.create_index(name, table, columns, unique=unique)
