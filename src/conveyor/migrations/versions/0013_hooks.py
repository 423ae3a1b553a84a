"""Completion hooks: the tasks a job's end submits, and the job each hook job is for.

``on_success`` and ``on_dead`` name the task run when the job succeeds or dies;
``hook_of`` is the job whose outcome made a hook job, unique so that a job's
outcome makes at most one hook job whatever races or redeliveries occur (NULLs
do not collide). Additive: older code keeps working on it.

Revision ID: 0013
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE on both databases: batch mode would recreate the table on
    # SQLite, and dropping it there deletes every job's events and attempts (cascade).
    op.add_column("conveyor_jobs", sa.Column("on_success", sa.String(200), nullable=True))
    op.add_column("conveyor_jobs", sa.Column("on_dead", sa.String(200), nullable=True))
    op.add_column("conveyor_jobs", sa.Column("hook_of", sa.String(36), nullable=True))
    op.create_index("uq_conveyor_jobs_hook_of", "conveyor_jobs", ["hook_of"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_conveyor_jobs_hook_of", table_name="conveyor_jobs")
    # Native DROP COLUMN (SQLite 3.35 or later), for the reason given in upgrade().
    for column in ("hook_of", "on_dead", "on_success"):
        op.execute(f"ALTER TABLE conveyor_jobs DROP COLUMN {column}")
