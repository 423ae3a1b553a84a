"""Circuit breakers: their shared state, and events of no job on the event log.

``conveyor_breakers`` holds one row per breaker. Breaker transitions are events
of the global stream, so they share the event log's id space (what makes
``Last-Event-ID`` resumption exact): ``job_id``, ``task`` and ``status`` of
``conveyor_job_events`` become nullable, and are NULL for such events.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from conveyor.models import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conveyor_breakers",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("window_started_at", UTCDateTime, nullable=True),
        sa.Column("opened_until", UTCDateTime, nullable=True),
        sa.Column("probes_in_flight", sa.Integer, nullable=False),
        sa.Column("probe_successes", sa.Integer, nullable=False),
        sa.Column("probe_lease_until", UTCDateTime, nullable=True),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    with op.batch_alter_table("conveyor_job_events") as batch:
        batch.alter_column("job_id", existing_type=sa.String(36), nullable=True)
        batch.alter_column("task", existing_type=sa.String(200), nullable=True)
        batch.alter_column("status", existing_type=sa.String(16), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM conveyor_job_events WHERE job_id IS NULL AND pipeline_id IS NULL")
    with op.batch_alter_table("conveyor_job_events") as batch:
        batch.alter_column("status", existing_type=sa.String(16), nullable=False)
        batch.alter_column("task", existing_type=sa.String(200), nullable=False)
        batch.alter_column("job_id", existing_type=sa.String(36), nullable=False)
    op.drop_table("conveyor_breakers")
