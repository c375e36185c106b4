"""dashboard accounts: users, their sessions, project memberships, invitations, sign-in failures

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'users',
        sa.Column('id', sa.String(length=36), primary_key=True),
        sa.Column('email', sa.String(length=320), nullable=False, unique=True),
        sa.Column('password_hash', sa.String(length=255), nullable=False),
        sa.Column('instance_owner', sa.Boolean(), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('password_changed_at', UTCDateTime(), nullable=False),
    )
    op.create_table(
        'dashboard_sessions',
        sa.Column('id', sa.String(length=36), primary_key=True),
        sa.Column('token_digest', sa.String(length=64), nullable=False, unique=True),
        sa.Column('user_id', sa.String(length=36), sa.ForeignKey('users.id', ondelete='CASCADE'), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('last_seen_at', UTCDateTime(), nullable=False),
        sa.Column('expires_at', UTCDateTime(), nullable=False),
        sa.Column('ip', sa.String(length=64), nullable=False),
        sa.Column('user_agent', sa.String(length=200), nullable=False),
    )
    op.create_index('ix_dashboard_sessions_user_id', 'dashboard_sessions', ['user_id'])
    op.create_table(
        'memberships',
        sa.Column('id', sa.String(length=36), primary_key=True),
        sa.Column('project_id', sa.String(length=36), sa.ForeignKey('projects.id', ondelete='CASCADE'),
                  nullable=False),
        sa.Column('user_id', sa.String(length=36), sa.ForeignKey('users.id', ondelete='CASCADE'), nullable=False),
        sa.Column('role', sa.String(length=16), nullable=False),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.UniqueConstraint('project_id', 'user_id'),
    )
    op.create_index('ix_memberships_user_id', 'memberships', ['user_id'])
    op.create_table(
        'invitations',
        sa.Column('id', sa.String(length=36), primary_key=True),
        sa.Column('project_id', sa.String(length=36), sa.ForeignKey('projects.id', ondelete='CASCADE'),
                  nullable=False),
        sa.Column('email', sa.String(length=320), nullable=False),
        sa.Column('role', sa.String(length=16), nullable=False),
        sa.Column('token_digest', sa.String(length=64), nullable=False, unique=True),
        sa.Column('invited_by', sa.String(length=36), nullable=True),
        sa.Column('created_at', UTCDateTime(), nullable=False),
        sa.Column('expires_at', UTCDateTime(), nullable=False),
        sa.Column('accepted_at', UTCDateTime(), nullable=True),
    )
    op.create_index('ix_invitations_project_id', 'invitations', ['project_id'])
    op.create_table(
        'login_failures',
        sa.Column('key', sa.String(length=400), primary_key=True),
        sa.Column('count', sa.Integer(), nullable=False),
        sa.Column('first_at', UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    for table in ('login_failures', 'invitations', 'memberships', 'dashboard_sessions', 'users'):
        op.drop_table(table)
