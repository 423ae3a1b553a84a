"""Errors recorded with text PostgreSQL's JSON operators refuse are escaped in place.

An exception message can hold a lone surrogate (Python decodes undecodable file
names that way) or a NUL character. PostgreSQL's ``json`` stores them as
escapes, but ``->>`` refuses to read such a value: one dead job like that made
every dead-letter query filtered by error type fail. Conveyor now escapes that
text when it records an error (``\\udce9``, ``\\x00``); this does the same for
the errors recorded before. Data only: the schema does not change.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

#: Tables with an ``error`` JSON column, and their primary key.
TABLES = (("conveyor_jobs", "id", sa.String(36)), ("conveyor_job_attempts", "id", sa.BigInteger))


def upgrade() -> None:
    conn = op.get_bind()
    for name, key, key_type in TABLES:
        table = sa.table(name, sa.column(key, key_type), sa.column("error", sa.JSON))
        text = sa.cast(table.c.error, sa.Text)
        # Only rows whose JSON text holds an escape that may be one (a pair of
        # surrogates is a character, and is left as it is).
        if conn.dialect.name == "postgresql":
            suspect = text.op("~")(r"\\u(0000|[dD][89a-fA-F])")
        else:
            suspect = text.like("%\\u%")
        query = sa.select(table.c[key], table.c.error).where(table.c.error.is_not(None), suspect)
        for row_id, error in conn.execute(query).all():
            fixed = _escaped(error)
            if fixed != error:
                conn.execute(sa.update(table).where(table.c[key] == row_id).values(error=fixed))


def downgrade() -> None:
    """Nothing to undo: the escaped text says what the original said."""


def _escaped(value: Any) -> Any:
    """Strings with lone surrogates written as ``\\udXXX`` and NUL as ``\\x00``."""
    if isinstance(value, str):
        text = value.encode("utf-8", "backslashreplace").decode("utf-8")
        return text.replace("\x00", "\\x00")
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    return value
