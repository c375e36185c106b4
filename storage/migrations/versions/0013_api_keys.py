"""dashboard keys: named secret keys (api_keys, each project's key so far becomes "default"), the public key

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'api_keys',
        sa.Column('id', sa.String(length=36), primary_key=True),
        sa.Column('project_id', sa.String(length=36), sa.ForeignKey('projects.id', ondelete='CASCADE'),
                  nullable=False),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('digest', sa.String(length=64), nullable=False, unique=True),
        sa.Column('hint', sa.String(length=16), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('rotated_at', UTCDateTime(), nullable=True),
        sa.Column('revoked_at', UTCDateTime(), nullable=True),
    )
    op.create_index('ix_api_keys_project_id_id', 'api_keys', ['project_id', 'id'])
    op.add_column('projects', sa.Column('public_key', sa.String(length=80), nullable=True))
    # Each project's one key so far, under the project's id (unique: one per project, and as old).
    op.execute("INSERT INTO api_keys (id, project_id, name, digest, hint, created_at) "
               "SELECT id, id, 'default', secret_key_digest, secret_key_hint, created_at FROM projects")


def downgrade() -> None:
    op.drop_column('projects', 'public_key')  # not batch: SQLite would copy projects, whose drop cascades
    op.drop_index('ix_api_keys_project_id_id', table_name='api_keys')
    op.drop_table('api_keys')
