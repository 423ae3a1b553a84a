"""Alembic environment: runs on the connection Conveyor's store hands it."""

from __future__ import annotations

from alembic import context

from conveyor.models import Base
from conveyor.store import VERSION_TABLE

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `conveyor migrate` or Store.migrate()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    version_table=VERSION_TABLE,
)
with context.begin_transaction():
    context.run_migrations()
