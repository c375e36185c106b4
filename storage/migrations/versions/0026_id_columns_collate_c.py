"""Every id column (VARCHAR(36)) collates "C" on PostgreSQL: compared byte by byte, whatever the database's locale

Revision ID: 0026
Revises: 0025

Ids are ASCII, and most indexes hold them: under a locale's collation each comparison in those indexes went
through the locale's rules (`storage.models.ID_TYPE`). Byte order is the order the ids were already read in (their
hex digits and dashes sort the same either way), so no query's result changes. PostgreSQL rebuilds each index on
these columns, and the foreign keys between them, while it holds the table: on a large database this upgrade takes
a while, once. SQLite compares text byte by byte already (BINARY): nothing changes there.
"""

from alembic import op

revision = '0026'
down_revision = '0025'
branch_labels = None
depends_on = None

ID_COLUMNS = {
    'api_keys': ('id', 'project_id'),
    'api_usage': ('project_id',),
    'campaigns': ('id', 'project_id', 'template_id', 'segment_id', 'content_id', 'fanout_cursor'),
    'contacts': ('id', 'project_id'),
    'contents': ('id', 'project_id'),
    'dashboard_sessions': ('id', 'user_id'),
    'domains': ('id', 'project_id'),
    'emails': ('id', 'project_id', 'contact_id', 'content_id', 'campaign_id'),
    'events': ('id', 'project_id', 'contact_id', 'email_id'),
    'idempotency_keys': ('id', 'project_id'),
    'import_jobs': ('id', 'project_id', 'created_by'),
    'inbound_attachments': ('id', 'message_id'),
    'inbound_messages': ('id', 'project_id', 'route_id', 'event_id'),
    'inbound_routes': ('id', 'project_id', 'domain_id'),
    'invitations': ('id', 'project_id', 'invited_by'),
    'memberships': ('id', 'project_id', 'user_id'),
    'nodes': ('id',),
    'outbox': ('id', 'email_id', 'campaign_id'),
    'projects': ('id',),
    'reputation_days': ('project_id',),
    'reputation_states': ('project_id',),
    'segment_members': ('segment_id', 'contact_id'),
    'segments': ('id', 'project_id'),
    'suppressions': ('id', 'project_id', 'email_id'),
    'template_drafts': ('id', 'project_id', 'user_id'),
    'templates': ('id', 'project_id'),
    'tracking_settings': ('project_id',),
    'users': ('id',),
    'webhook_deliveries': ('id', 'endpoint_id', 'event_id', 'claimed_by'),
    'webhook_endpoints': ('id', 'project_id'),
    'workflow_runs': ('id', 'workflow_id', 'project_id', 'contact_id', 'once_key', 'trigger_event_id'),
    'workflow_triggers': ('workflow_id', 'project_id'),
    'workflows': ('id', 'project_id'),
}
"""Every VARCHAR(36) column at revision 0025, by table."""


def _collate(collation: str) -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for table, columns in ID_COLUMNS.items():
        changes = ', '.join(f'ALTER COLUMN {column} TYPE VARCHAR(36) COLLATE "{collation}"' for column in columns)
        op.execute(f'ALTER TABLE {table} {changes}')


def upgrade() -> None:
    _collate('C')


def downgrade() -> None:
    _collate('default')
