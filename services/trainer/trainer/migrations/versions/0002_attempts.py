"""A retry policy on every job and a row per attempt.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("max_attempts", sa.Integer, nullable=False, server_default="3"))
        batch.add_column(sa.Column("retry_on_error", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_table(
        "job_attempts",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("worker", sa.String(255)),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("resumed_from_step", sa.Integer),
    )
    # A job from before has its current attempt only: the earlier ones were never recorded.
    op.execute(
        "INSERT INTO job_attempts (job_id, attempt, status, error, started_at, finished_at) "
        "SELECT id, attempts + 1, status, error, started_at, finished_at FROM jobs"
    )


def downgrade() -> None:
    op.drop_table("job_attempts")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("retry_on_error")
        batch.drop_column("max_attempts")
