"""Scheduled AI tasks: their definitions, and the tokens each AI job used; and an
index on idempotency keys' job, which retention's cascading deletes look them up by.

Revision ID: 0017
Revises: 0012
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from conveyor.models import UTCDateTime

revision = "0017"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conveyor_ai_tasks",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("schedule", sa.String(200), nullable=True),
        sa.Column("notify", sa.JSON(), nullable=True),
        sa.Column("owner_key_id", sa.String(36), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "conveyor_llm_usage",
        sa.Column("job_id", sa.String(36), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )

    op.create_index("ix_conveyor_idempotency_keys_job_id", "conveyor_idempotency_keys", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_conveyor_idempotency_keys_job_id", table_name="conveyor_idempotency_keys")
    op.drop_table("conveyor_llm_usage")
    op.drop_table("conveyor_ai_tasks")
