"""Notifications: what each notification job sent, and recipients' opt-outs.

Revision ID: 0015
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from conveyor.models import BigId, UTCDateTime

revision = "0015"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conveyor_notifications",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("recipient", sa.String(2048), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("provider_id", sa.String(255), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("sent_at", UTCDateTime(), nullable=True),
        sa.UniqueConstraint(
            "job_id", "channel", "recipient", name="uq_conveyor_notifications_send"
        ),
    )
    op.create_index("ix_conveyor_notifications_recipient", "conveyor_notifications", ["recipient"])
    op.create_table(
        "conveyor_notification_recipients",
        sa.Column("address", sa.String(2048), primary_key=True),
        sa.Column("notifications_enabled", sa.Boolean(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("conveyor_notification_recipients")
    op.drop_index("ix_conveyor_notifications_recipient", table_name="conveyor_notifications")
    op.drop_table("conveyor_notifications")
