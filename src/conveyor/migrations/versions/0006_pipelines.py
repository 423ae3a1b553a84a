"""Pipelines: DAGs of steps, their steps, and the jobs and events that belong to them.

Jobs gain the pipeline, step and item (index in a mapped step) they run; events
gain ``pipeline_id`` for the events of a pipeline and of its steps, which have
no job (``job_id`` becomes nullable). Additive: older code keeps working on it.

Revision ID: 0006
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from conveyor.models import UTCDateTime

revision = "0006"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conveyor_pipelines",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("steps", sa.Integer, nullable=False),
        sa.Column("correlation_id", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime, nullable=True),
        sa.Column("idempotency_scope", sa.String(100), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=True),
        sa.UniqueConstraint(
            "idempotency_scope", "idempotency_key", name="uq_conveyor_pipelines_idempotency"
        ),
    )
    op.create_index("ix_conveyor_pipelines_created", "conveyor_pipelines", ["created_at"])
    op.create_table(
        "conveyor_pipeline_steps",
        sa.Column(
            "pipeline_id",
            sa.String(36),
            sa.ForeignKey("conveyor_pipelines.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("payload", sa.JSON, nullable=True),
        sa.Column("after", sa.JSON, nullable=False),
        sa.Column("map", sa.String(200), nullable=True),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("items", sa.Integer, nullable=True),
        sa.Column("done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("finished_at", UTCDateTime, nullable=True),
    )
    with op.batch_alter_table("conveyor_jobs") as batch:
        batch.add_column(sa.Column("pipeline_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("step", sa.String(200), nullable=True))
        batch.add_column(sa.Column("item", sa.Integer, nullable=True))
    op.create_index(
        "ix_conveyor_jobs_pipeline_step", "conveyor_jobs", ["pipeline_id", "step", "item"]
    )
    with op.batch_alter_table("conveyor_job_events") as batch:
        batch.alter_column("job_id", existing_type=sa.String(36), nullable=True)
        batch.add_column(sa.Column("pipeline_id", sa.String(36), nullable=True))
        batch.create_foreign_key(
            "fk_conveyor_job_events_pipeline_id",
            "conveyor_pipelines",
            ["pipeline_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch.create_index("ix_conveyor_job_events_pipeline_id", ["pipeline_id"])


def downgrade() -> None:
    with op.batch_alter_table("conveyor_job_events") as batch:
        batch.drop_index("ix_conveyor_job_events_pipeline_id")
        batch.drop_constraint("fk_conveyor_job_events_pipeline_id", type_="foreignkey")
        batch.drop_column("pipeline_id")
    op.execute("DELETE FROM conveyor_job_events WHERE job_id IS NULL")
    with op.batch_alter_table("conveyor_job_events") as batch:
        batch.alter_column("job_id", existing_type=sa.String(36), nullable=False)
    op.drop_index("ix_conveyor_jobs_pipeline_step", "conveyor_jobs")
    if op.get_bind().dialect.name == "sqlite":
        # SQLite's own DROP COLUMN (3.35+): a batch copy of conveyor_jobs would drop the
        # table, and every job event with it through their cascading foreign key.
        for column in ("item", "step", "pipeline_id"):
            op.execute(f"ALTER TABLE conveyor_jobs DROP COLUMN {column}")
    else:
        with op.batch_alter_table("conveyor_jobs") as batch:
            batch.drop_column("item")
            batch.drop_column("step")
            batch.drop_column("pipeline_id")
    op.drop_table("conveyor_pipeline_steps")
    op.drop_index("ix_conveyor_pipelines_created", "conveyor_pipelines")
    op.drop_table("conveyor_pipelines")
