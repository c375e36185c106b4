"""rate_schedules and api_usage: the send rate and the API rate limit shared by every node

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('rate_schedules',
                    sa.Column('name', sa.String(length=64), nullable=False),
                    sa.Column('tat', sa.Float(), nullable=False),
                    sa.PrimaryKeyConstraint('name'))
    op.create_table('api_usage',
                    sa.Column('project_id', sa.String(length=36), nullable=False),
                    sa.Column('window_start', sa.BigInteger(), nullable=False),
                    sa.Column('used', sa.Integer(), nullable=False),
                    sa.PrimaryKeyConstraint('project_id', 'window_start'))


def downgrade() -> None:
    op.drop_table('api_usage')
    op.drop_table('rate_schedules')
