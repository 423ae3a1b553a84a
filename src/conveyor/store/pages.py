"""Keyset pagination: newest first by a timestamp, ties broken by id.

A cursor is the (timestamp, id) of the last row of a page, base64 JSON, so it
stays valid while rows are added; it is opaque to clients.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, and_, or_

from conveyor.jobs import Job

T = TypeVar("T")


def encode_cursor(at: datetime, key: str) -> str:
    raw = json.dumps([at.isoformat(), key]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Raises ValueError on anything that is not a cursor this store made."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at_text, key = json.loads(raw)
        at = datetime.fromisoformat(at_text)
        if at.tzinfo is None:
            raise ValueError("naive timestamp")
        return at, str(key)
    except Exception as exc:
        raise ValueError("invalid cursor") from exc


def job_cursor(job: Job) -> str:
    """The cursor after ``job`` in a list of jobs (newest created first)."""
    return encode_cursor(job.created_at, job.id)


def dead_letter_cursor(job: Job) -> str:
    """The cursor after ``job`` in a list of dead letters (the last to die first)."""
    assert job.finished_at is not None, "a dead job has ended"
    return encode_cursor(job.finished_at, job.id)


def newest_first(
    query: Select[Any], at: ColumnElement[Any], key: ColumnElement[Any], cursor: str | None
) -> Select[Any]:
    """``query`` ordered newest first, starting after ``cursor`` if one is given."""
    query = query.order_by(at.desc(), key.desc())
    if cursor:
        last_at, last_key = decode_cursor(cursor)
        query = query.where(or_(at < last_at, and_(at == last_at, key < last_key)))
    return query


def cut(
    rows: Sequence[T], limit: int, position: Callable[[T], tuple[datetime | None, str]]
) -> tuple[list[T], str | None]:
    """A page of at most ``limit`` of ``rows`` (read with ``limit + 1``) and the next cursor."""
    page = list(rows[:limit])
    if len(rows) <= limit or not page:
        return page, None
    at, key = position(page[-1])
    return page, encode_cursor(at, key) if at is not None else None
