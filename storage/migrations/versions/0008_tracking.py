"""open and click tracking: each email's tracking choice, and a project's defaults

Plain ALTER TABLE … ADD COLUMN with a constant default (no row is copied) and one new table.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

import storage.models

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('emails', sa.Column('track_opens', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column('emails', sa.Column('track_clicks', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table('tracking_settings',
    sa.Column('project_id', sa.String(length=36), nullable=False),
    sa.Column('marketing_opens', sa.Boolean(), nullable=False),
    sa.Column('marketing_clicks', sa.Boolean(), nullable=False),
    sa.Column('transactional_opens', sa.Boolean(), nullable=False),
    sa.Column('transactional_clicks', sa.Boolean(), nullable=False),
    sa.Column('updated_at', storage.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('project_id')
    )


def downgrade() -> None:
    op.drop_table('tracking_settings')
    with op.batch_alter_table('emails') as batch_op:
        batch_op.drop_column('track_clicks')
        batch_op.drop_column('track_opens')
