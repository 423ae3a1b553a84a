"""Jobs, their event log and API keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from conveyor.models import BigId, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conveyor_jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("queue", sa.String(200), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("timeout", sa.Float, nullable=True),
        sa.Column("progress_percent", sa.Float, nullable=True),
        sa.Column("progress_step", sa.Text, nullable=True),
        sa.Column("progress_message", sa.Text, nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("error", sa.JSON, nullable=True),
        sa.Column("correlation_id", sa.String(200), nullable=False),
        sa.Column("worker", sa.String(300), nullable=True),
        sa.Column("event_seq", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("finished_at", UTCDateTime, nullable=True),
        sa.Column("next_attempt_at", UTCDateTime, nullable=True),
    )
    op.create_index("ix_conveyor_jobs_status_created", "conveyor_jobs", ["status", "created_at"])
    op.create_index("ix_conveyor_jobs_task_created", "conveyor_jobs", ["task", "created_at"])
    op.create_table(
        "conveyor_job_events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "job_id",
            sa.String(36),
            sa.ForeignKey("conveyor_jobs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("job_id", "seq", name="uq_conveyor_job_events_job_seq"),
    )
    op.create_table(
        "conveyor_api_keys",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("revoked_at", UTCDateTime, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("conveyor_api_keys")
    op.drop_table("conveyor_job_events")
    op.drop_index("ix_conveyor_jobs_task_created", "conveyor_jobs")
    op.drop_index("ix_conveyor_jobs_status_created", "conveyor_jobs")
    op.drop_table("conveyor_jobs")
