"""Schedules and delayed jobs: ``run_at`` and the schedule a job came from, and the
``conveyor_schedules`` table. Jobs of the ``scheduled`` status wait in the store.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from conveyor.models import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("conveyor_jobs") as batch:
        batch.add_column(sa.Column("run_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("schedule", sa.String(200), nullable=True))
        batch.add_column(sa.Column("schedule_tick", UTCDateTime, nullable=True))
    # An index, not a constraint: adding a constraint makes SQLite copy the table, and
    # dropping the old copy would cascade to every job's events and attempts.
    op.create_index(
        "uq_conveyor_jobs_schedule_tick",
        "conveyor_jobs",
        ["schedule", "schedule_tick"],
        unique=True,
    )
    op.create_index("ix_conveyor_jobs_status_run_at", "conveyor_jobs", ["status", "run_at"])
    op.create_table(
        "conveyor_schedules",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("cron", sa.String(200), nullable=True),
        sa.Column("every", sa.Integer, nullable=True),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("queue", sa.String(200), nullable=True),
        sa.Column("priority", sa.Integer, nullable=True),
        sa.Column("catchup", sa.String(16), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("paused_reason", sa.Text, nullable=True),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("next_fire_at", UTCDateTime, nullable=True),
        sa.Column("last_fire_at", UTCDateTime, nullable=True),
        sa.Column("last_job_id", sa.String(36), nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index(
        "ix_conveyor_schedules_enabled_next", "conveyor_schedules", ["enabled", "next_fire_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_conveyor_schedules_enabled_next", "conveyor_schedules")
    op.drop_table("conveyor_schedules")
    # Scheduled jobs cannot be told apart once run_at is gone: queue them now.
    op.execute("UPDATE conveyor_jobs SET status = 'queued' WHERE status = 'scheduled'")
    op.drop_index("ix_conveyor_jobs_status_run_at", "conveyor_jobs")
    op.drop_index("uq_conveyor_jobs_schedule_tick", "conveyor_jobs")
    # Not a batch: SQLite would copy the jobs table, and dropping the old copy would
    # cascade to every job's events and attempts. SQLite drops columns itself (3.35+).
    for column in ("schedule_tick", "schedule", "run_at"):
        op.execute(sa.text(f"ALTER TABLE conveyor_jobs DROP COLUMN {column}"))
