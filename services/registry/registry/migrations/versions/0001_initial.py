"""The initial schema: models, versions, files, blobs, aliases.

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
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "models",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("last_version", sa.Integer, nullable=False),
        sa.Column("created_at", ts, nullable=False),
    )
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), sa.ForeignKey("models.name"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("step", sa.BigInteger, nullable=True),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("parent_name", sa.String(128), nullable=True),
        sa.Column("parent_version", sa.Integer, nullable=True),
        sa.Column("job_id", sa.String(128), nullable=True),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("updated_at", ts, nullable=False),
        sa.Column("committed_at", ts, nullable=True),
        sa.Column("deleted_at", ts, nullable=True),
        sa.UniqueConstraint("name", "version", name="uq_versions_name_version"),
    )
    op.create_index("ix_versions_name", "versions", ["name"])
    op.create_index("ix_versions_stage", "versions", ["stage"])
    op.create_index("ix_versions_state", "versions", ["state"])
    op.create_table(
        "files",
        sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("path", sa.String(512), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
    )
    op.create_index("ix_files_sha256", "files", ["sha256"])
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created_at", ts, nullable=False),
    )
    op.create_table(
        "aliases",
        sa.Column("name", sa.String(128), sa.ForeignKey("models.name"), primary_key=True),
        sa.Column("alias", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("updated_at", ts, nullable=False),
    )


def downgrade() -> None:
    for table in ("aliases", "blobs", "files", "versions", "models"):
        op.drop_table(table)
