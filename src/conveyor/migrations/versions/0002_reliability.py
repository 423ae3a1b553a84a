"""Reliability: retry policy per job, dispatch bookkeeping, replays, attempts,
worker heartbeats and idempotency keys; ``failed`` becomes ``dead``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from conveyor.models import BigId, UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("conveyor_jobs") as batch:
        batch.add_column(sa.Column("backoff_base", sa.Float, nullable=False, server_default="1.0"))
        batch.add_column(sa.Column("backoff_cap", sa.Float, nullable=False, server_default="300.0"))
        batch.add_column(sa.Column("dispatched_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("replay_of", sa.String(36), nullable=True))
    op.create_index("ix_conveyor_jobs_replay_of", "conveyor_jobs", ["replay_of"])
    op.create_index("ix_conveyor_jobs_status_finished", "conveyor_jobs", ["status", "finished_at"])
    op.execute("UPDATE conveyor_jobs SET status = 'dead' WHERE status = 'failed'")
    op.execute("UPDATE conveyor_job_events SET status = 'dead' WHERE status = 'failed'")
    # Jobs already queued were handed to the broker when they were submitted.
    op.execute(
        "UPDATE conveyor_jobs SET dispatched_at = updated_at"
        " WHERE status IN ('queued', 'retrying', 'running')"
    )
    op.create_table(
        "conveyor_job_attempts",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "job_id",
            sa.String(36),
            sa.ForeignKey("conveyor_jobs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("worker", sa.String(300), nullable=True),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("finished_at", UTCDateTime, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.JSON, nullable=True),
        sa.UniqueConstraint("job_id", "attempt", name="uq_conveyor_job_attempts_job_attempt"),
    )
    op.create_table(
        "conveyor_workers",
        sa.Column("id", sa.String(300), primary_key=True),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("last_seen", UTCDateTime, nullable=False),
        sa.Column("stopped_at", UTCDateTime, nullable=True),
    )
    op.create_table(
        "conveyor_idempotency_keys",
        sa.Column("scope", sa.String(100), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column(
            "job_id",
            sa.String(36),
            sa.ForeignKey("conveyor_jobs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("completed_at", UTCDateTime, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("conveyor_idempotency_keys")
    op.drop_table("conveyor_workers")
    op.drop_table("conveyor_job_attempts")
    op.execute("UPDATE conveyor_job_events SET status = 'failed' WHERE status = 'dead'")
    op.execute("UPDATE conveyor_jobs SET status = 'failed' WHERE status = 'dead'")
    op.drop_index("ix_conveyor_jobs_status_finished", "conveyor_jobs")
    op.drop_index("ix_conveyor_jobs_replay_of", "conveyor_jobs")
    with op.batch_alter_table("conveyor_jobs") as batch:
        batch.drop_column("replay_of")
        batch.drop_column("dispatched_at")
        batch.drop_column("backoff_cap")
        batch.drop_column("backoff_base")
