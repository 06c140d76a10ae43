"""Jobs and their nodes.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("idempotency_key", sa.String(200), unique=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("nnodes", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("step_index", sa.Integer, nullable=False),
        sa.Column("current_stage", sa.String(64)),
        sa.Column("step", sa.Integer),
        sa.Column("total", sa.Integer),
        sa.Column("eta_s", sa.Float),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("produced", sa.JSON, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("log_tail", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])
    op.create_table(
        "job_nodes",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("node_rank", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255)),
        sa.Column("worker", sa.String(255)),
        sa.Column("pgid", sa.Integer),
        sa.Column("heartbeat_at", sa.Float),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_job_nodes_status", "job_nodes", ["status"])
    op.create_index("ix_job_nodes_host", "job_nodes", ["host"])


def downgrade() -> None:
    op.drop_table("job_nodes")
    op.drop_table("jobs")
