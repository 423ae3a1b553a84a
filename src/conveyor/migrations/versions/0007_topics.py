"""Domain events: each event published on a topic, with the jobs it made.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from conveyor.models import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conveyor_topic_events",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("job_ids", sa.JSON(), nullable=False),
        sa.Column("correlation_id", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_index(
        "ix_conveyor_topic_events_topic_created", "conveyor_topic_events", ["topic", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_conveyor_topic_events_topic_created", table_name="conveyor_topic_events")
    op.drop_table("conveyor_topic_events")
