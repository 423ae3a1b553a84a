"""The queues each worker consumes, for ``GET /v1/queues``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("conveyor_workers") as table:
        table.add_column(sa.Column("queues", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("conveyor_workers") as table:
        table.drop_column("queues")
