"""workflow runs by workflow and last change: whether a workflow page's passed counts still hold

Revision ID: 0019
Revises: 0018

`pipeline.workflows.rules.step_counts` keeps the per-step passed counts (a read of every run's history) until
a run of the workflow changes; count(*) and max(updated_at) over this index say whether one did. Plain
CREATE INDEX: no table rebuild on SQLite.
"""

from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_workflow_runs_workflow_id_updated_at', 'workflow_runs', ['workflow_id', 'updated_at'])


def downgrade() -> None:
    op.drop_index('ix_workflow_runs_workflow_id_updated_at', table_name='workflow_runs')
