"""workflow runs by workflow and last change, and by workflow, status and step: the workflow pages' counts

Revision ID: 0019
Revises: 0018

`pipeline.workflows.rules.workflow_counts` keeps the per-step passed counts (a read of every run's history) until
a run of the workflow changes; count(*) and max(updated_at) over (workflow_id, updated_at) say whether one
did. The runs per status (the list's run counts) and per step and status (the graph's waiting and failed)
are read from (workflow_id, status, step_id) alone, not from every run's row. Plain CREATE INDEX: no table
rebuild on SQLite.
"""

from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_workflow_runs_workflow_id_updated_at', 'workflow_runs', ['workflow_id', 'updated_at'])
    op.create_index('ix_workflow_runs_workflow_id_status_step_id', 'workflow_runs',
                    ['workflow_id', 'status', 'step_id'])


def downgrade() -> None:
    op.drop_index('ix_workflow_runs_workflow_id_status_step_id', table_name='workflow_runs')
    op.drop_index('ix_workflow_runs_workflow_id_updated_at', table_name='workflow_runs')
