"""The trace context a job was submitted in, which its attempts' spans continue.

Revision ID: 0012
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE on both databases, as 0005: batch mode would recreate the table
    # on SQLite, and dropping it there deletes every job's events and attempts (cascade).
    op.add_column("conveyor_jobs", sa.Column("traceparent", sa.String(55), nullable=True))
    op.add_column("conveyor_jobs", sa.Column("tracestate", sa.String(512), nullable=True))


def downgrade() -> None:
    op.execute("ALTER TABLE conveyor_jobs DROP COLUMN tracestate")
    op.execute("ALTER TABLE conveyor_jobs DROP COLUMN traceparent")
