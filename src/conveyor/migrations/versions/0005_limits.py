"""Rate and concurrency limits: each job's limit key and hold, the per-key rows that
limited claims lock, and the recent starts of rate-limited tasks.

Revision ID: 0005
Revises: 0009
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from conveyor.models import BigId, UTCDateTime

revision = "0005"
# Revisions are numbered by feature, not in order: the limits came last.
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE on both databases: batch mode would recreate the table on
    # SQLite, and dropping it there deletes every job's events and attempts (cascade).
    op.add_column("conveyor_jobs", sa.Column("limit_key", sa.Text(), nullable=True))
    op.add_column("conveyor_jobs", sa.Column("throttled", sa.String(16), nullable=True))
    op.create_index("ix_conveyor_jobs_limit_key_status", "conveyor_jobs", ["limit_key", "status"])
    op.create_table(
        "conveyor_limits",
        sa.Column("key", sa.Text(), primary_key=True),
        sa.Column("touched_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "conveyor_limit_starts",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_conveyor_limit_starts_key_at", "conveyor_limit_starts", ["key", "at"])


def downgrade() -> None:
    op.drop_index("ix_conveyor_limit_starts_key_at", table_name="conveyor_limit_starts")
    op.drop_table("conveyor_limit_starts")
    op.drop_table("conveyor_limits")
    op.drop_index("ix_conveyor_jobs_limit_key_status", table_name="conveyor_jobs")
    # Native DROP COLUMN (SQLite 3.35 or later), for the reason given in upgrade().
    op.execute("ALTER TABLE conveyor_jobs DROP COLUMN throttled")
    op.execute("ALTER TABLE conveyor_jobs DROP COLUMN limit_key")
