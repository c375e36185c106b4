"""emails: ix_emails_message_id holds only the Message-IDs plunkd did not make

Revision ID: 0027
Revises: 0026

A Message-ID plunkd makes is the email's own id at a domain (`storage.emails.generated_message_id`): a report
naming one finds its email by that id. Every email accepted through the API and every campaign recipient queued
wrote an entry for it in this index all the same, one of a dozen index entries per email. The index becomes
partial: only the Message-IDs clients relayed over SMTP with their mail (`storage.models.FOREIGN_MESSAGE_ID`).
"""

import sqlalchemy as sa
from alembic import op

revision = '0027'
down_revision = '0026'
branch_labels = None
depends_on = None

FOREIGN_MESSAGE_ID = "message_id NOT LIKE '<' || id || '@%'"


def upgrade() -> None:
    op.drop_index('ix_emails_message_id', table_name='emails')
    op.create_index('ix_emails_message_id', 'emails', ['message_id'], sqlite_where=sa.text(FOREIGN_MESSAGE_ID),
                    postgresql_where=sa.text(FOREIGN_MESSAGE_ID))


def downgrade() -> None:
    op.drop_index('ix_emails_message_id', table_name='emails')
    op.create_index('ix_emails_message_id', 'emails', ['message_id'])
