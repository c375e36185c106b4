"""workflows (automations, legacy actions) and their runs

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

import storage.models

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('workflows',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('exclude_events', sa.JSON(), nullable=False),
    sa.Column('definition', sa.JSON(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('run_once', sa.Boolean(), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('created_at', storage.models.UTCDateTime(), nullable=False),
    sa.Column('updated_at', storage.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_workflows_project_id_id', 'workflows', ['project_id', 'id'])
    op.create_table('workflow_triggers',
    sa.Column('workflow_id', sa.String(length=36), nullable=False),
    sa.Column('event', sa.String(length=200), nullable=False),
    sa.Column('project_id', sa.String(length=36), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['workflow_id'], ['workflows.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('workflow_id', 'event')
    )
    op.create_index('ix_workflow_triggers_project_id_event', 'workflow_triggers', ['project_id', 'event'])
    op.create_table('workflow_runs',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('workflow_id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=36), nullable=False),
    sa.Column('contact_id', sa.String(length=36), nullable=False),
    sa.Column('status', sa.String(length=12), nullable=False),
    sa.Column('step_id', sa.String(length=64), nullable=True),
    sa.Column('due_at', storage.models.UTCDateTime(), nullable=True),
    sa.Column('waiting_for', sa.String(length=200), nullable=True),
    sa.Column('once_key', sa.String(length=36), nullable=False),
    sa.Column('trigger_event_id', sa.String(length=36), nullable=True),
    sa.Column('context', sa.JSON(), nullable=False),
    sa.Column('history', sa.JSON(), nullable=False),
    sa.Column('emails_sent', sa.Integer(), nullable=False),
    sa.Column('created_at', storage.models.UTCDateTime(), nullable=False),
    sa.Column('updated_at', storage.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['contact_id'], ['contacts.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['workflow_id'], ['workflows.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_workflow_runs_status_due_at', 'workflow_runs', ['status', 'due_at'])
    op.create_index('ix_workflow_runs_workflow_id_id', 'workflow_runs', ['workflow_id', 'id'])
    op.create_index('ix_workflow_runs_contact_id', 'workflow_runs', ['contact_id'])
    op.create_index('uq_workflow_runs_once', 'workflow_runs', ['workflow_id', 'contact_id', 'once_key'], unique=True)


def downgrade() -> None:
    op.drop_table('workflow_runs')
    op.drop_table('workflow_triggers')
    op.drop_table('workflows')
