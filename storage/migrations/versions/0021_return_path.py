"""return paths: a domain's MAIL FROM subdomain, a project's VERP choice for relayed mail, Message-ID lookups

Revision ID: 0021
Revises: 0020

`domains.return_path` (e.g. bounces.example.com) and whether its MX and SPF records were found
(`return_path_verified`): the dispatcher then delivers with a VERP envelope sender on it. `projects.verp_relay`:
mail relayed over SMTP gets one too instead of the client's MAIL FROM. `ix_emails_message_id`: a complaint
report that carries no VERP address is matched by the original Message-ID.
"""

import sqlalchemy as sa
from alembic import op

revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('domains', sa.Column('return_path', sa.String(length=253), nullable=True))
    op.add_column('domains', sa.Column('return_path_verified', sa.Boolean(), server_default=sa.false(),
                                       nullable=False))
    op.add_column('projects', sa.Column('verp_relay', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_index('ix_emails_message_id', 'emails', ['message_id'])


def downgrade() -> None:
    op.drop_index('ix_emails_message_id', table_name='emails')
    with op.batch_alter_table('projects') as batch_op:
        batch_op.drop_column('verp_relay')
    with op.batch_alter_table('domains') as batch_op:
        batch_op.drop_column('return_path_verified')
        batch_op.drop_column('return_path')
