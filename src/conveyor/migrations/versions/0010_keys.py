"""API keys with scopes, expiry and a rate limit; who owns each job, pipeline and
published event; and the audit trail.

Revision ID: 0010
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from conveyor.models import BigId, UTCDateTime

revision = "0010"
down_revision = "0014"
branch_labels = None
depends_on = None

#: Tables whose rows belong to the key that made them (NULL: made from Python, a
#: schedule, or before keys had owners; only keys that read everything see those).
OWNED = ("conveyor_jobs", "conveyor_pipelines", "conveyor_topic_events")


def upgrade() -> None:
    # Plain ALTER TABLE on both databases: batch mode would recreate the tables on
    # SQLite, and dropping conveyor_jobs there deletes its events and attempts (cascade).
    op.add_column("conveyor_api_keys", sa.Column("expires_at", UTCDateTime(), nullable=True))
    op.add_column("conveyor_api_keys", sa.Column("rate_limit", sa.String(64), nullable=True))
    op.create_index("ix_conveyor_api_keys_name", "conveyor_api_keys", ["name"])
    for table in OWNED:
        op.add_column(table, sa.Column("owner_key_id", sa.String(36), nullable=True))
        op.create_index(f"ix_{table}_owner_key_id", table, ["owner_key_id"])
    op.create_table(
        "conveyor_audit",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("key_id", sa.String(36), nullable=True),
        sa.Column("key_name", sa.String(200), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("object_type", sa.String(32), nullable=False),
        sa.Column("object_id", sa.String(200), nullable=True),
        sa.Column("address", sa.String(64), nullable=True),
        sa.Column("correlation_id", sa.String(200), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
    )
    op.create_index("ix_conveyor_audit_key_id", "conveyor_audit", ["key_id", "id"])
    op.create_index("ix_conveyor_audit_object_id", "conveyor_audit", ["object_id", "id"])
    op.create_index("ix_conveyor_audit_action", "conveyor_audit", ["action", "id"])


def downgrade() -> None:
    op.drop_index("ix_conveyor_audit_action", table_name="conveyor_audit")
    op.drop_index("ix_conveyor_audit_object_id", table_name="conveyor_audit")
    op.drop_index("ix_conveyor_audit_key_id", table_name="conveyor_audit")
    op.drop_table("conveyor_audit")
    for table in reversed(OWNED):
        op.drop_index(f"ix_{table}_owner_key_id", table_name=table)
        # Native DROP COLUMN (SQLite 3.35 or later), for the reason given in upgrade().
        op.execute(f"ALTER TABLE {table} DROP COLUMN owner_key_id")
    op.drop_index("ix_conveyor_api_keys_name", table_name="conveyor_api_keys")
    op.execute("ALTER TABLE conveyor_api_keys DROP COLUMN rate_limit")
    op.execute("ALTER TABLE conveyor_api_keys DROP COLUMN expires_at")
