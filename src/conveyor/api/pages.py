"""List responses bounded in bytes as well as in items.

A page stops at ``limit`` items or once its items reach :data:`MAX_PAGE_BYTES`
of JSON, whichever comes first, and its ``next_cursor`` then points after the
last item it holds. An item bigger than the bound comes alone on its page, so
paging always moves on. The store is read in chunks sized from the items seen
so far, so a page of large jobs never holds more than a few of them in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TypeVar

from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import Response

from conveyor.store.pages import decode_cursor

T = TypeVar("T")

#: A page's items stop growing past this many bytes of JSON.
MAX_PAGE_BYTES = 1024 * 1024
#: Rows read from the store first, before item sizes are known.
FIRST_CHUNK = 25

#: Reads up to ``count`` rows after ``cursor``; returns them and the cursor after them
#: (None when there are no more).
Fetch = Callable[[str | None, int], tuple[list[T], str | None]]


def check_cursor(cursor: str | None, *, numeric: bool = False) -> None:
    """400 for a cursor no page of this API made, before anything is read: the store
    would otherwise take a forged one for a position. ``numeric``: its key is a row
    number (the audit trail's)."""
    if cursor is None:
        return
    try:
        _, key = decode_cursor(cursor)
        if numeric:
            int(key)
    except ValueError:
        raise HTTPException(400, "invalid cursor: pass back a next_cursor unchanged") from None


def bounded_page(
    fetch: Fetch[T],
    render: Callable[[Sequence[T]], Sequence[BaseModel]],
    cursor_after: Callable[[T], str],
    *,
    cursor: str | None,
    limit: int,
    max_bytes: int = MAX_PAGE_BYTES,
) -> Response:
    """``{"items": [...], "next_cursor": ...}`` as JSON, each item serialised once."""
    items: list[bytes] = []
    size = 0
    while True:
        room = limit - len(items)
        if items:  # as many more as the bytes left are likely to hold, and one over
            room = min(room, (max_bytes - size) * len(items) // size + 1)
        rows, after = fetch(cursor, min(room, FIRST_CHUNK) if not items else room)
        for row, item in zip(rows, render(rows), strict=True):
            data = item.model_dump_json().encode()
            if items and size + len(data) > max_bytes:
                return _page(items, cursor)  # ``cursor`` is after the last item taken
            items.append(data)
            size += len(data)
            cursor = cursor_after(row)
        if after is None:
            return _page(items, None)
        cursor = after
        if len(items) >= limit or size >= max_bytes:
            return _page(items, cursor)


def _page(items: list[bytes], next_cursor: str | None) -> Response:
    body = b'{"items":[' + b",".join(items) + b'],"next_cursor":'
    return Response(body + json.dumps(next_cursor).encode() + b"}", media_type="application/json")
