"""events: drop ix_events_contact_id, which ix_events_contact_id_id covers

Revision ID: 0025
Revises: 0024

Both indexes lead with contact_id: every lookup of a contact's events (its page, the foreign key's cascade when the
contact is deleted, `storage.contacts.detach_rows`) is served by (contact_id, id), and the one-column index was one
more B-tree entry written with every event (each track, send and delivery records one).
"""

from alembic import op

revision = '0025'
down_revision = '0024'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index('ix_events_contact_id', table_name='events')
    if op.get_bind().dialect.name == 'sqlite':
        # The index's pages go back to the file system now (auto_vacuum is INCREMENTAL, storage.db), not at the
        # pruner's next pass: a database made fresh has no free page.
        op.execute('PRAGMA incremental_vacuum')


def downgrade() -> None:
    op.create_index('ix_events_contact_id', 'events', ['contact_id'])
