"""Transactional enqueue: jobs written in the caller's own database transaction.

A submit or publish given the caller's SQLAlchemy ``Connection`` or ``Session``
writes its rows in that transaction: if the caller rolls back, no job exists;
once it commits, the jobs run. The broker must hear of them only after the
commit, so the rows are recorded as not dispatched yet, and then:

- with a ``Session``, its ``after_commit`` event dispatches them and publishes
  their events at once (``after_rollback`` forgets them);
- with a ``Connection``, SQLAlchemy announces a commit only *before* it
  happens, so the announcement starts a short watch: once another transaction
  can see the rows, they are dispatched; if the commit failed, the watch gives
  up after :data:`WATCH_SECONDS`.

Whatever this misses (the process died right after the commit) a recovery sweep
dispatches within ``sweep_interval``: the rows say they were never dispatched.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import structlog
from sqlalchemy import Connection, event
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from conveyor.errors import ConfigurationError

log = structlog.get_logger("conveyor")

#: The caller's own connection or ORM session, as ``submit(..., connection=...)`` takes it.
CallerConnection = Connection | Session

#: How long a watch waits for a connection's announced commit to become visible.
WATCH_SECONDS = 5.0
_WATCH_STEP = 0.01

Callback = Callable[[], None]
#: Per connection or session: what to run once its current transaction commits.
_pending: weakref.WeakKeyDictionary[Connection | Session, list[tuple[Callback, Callable[[], bool]]]]
_pending = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def enlist(target: CallerConnection, store_url: URL) -> Connection:
    """The connection to write on in the caller's transaction; ConfigurationError
    unless it is on the store's database."""
    if not isinstance(target, Connection | Session):
        raise ConfigurationError(
            f"connection must be a SQLAlchemy Connection or Session, not {type(target).__name__}"
        )
    conn = target.connection() if isinstance(target, Session) else target
    if _where(conn.engine.url) != _where(store_url):
        raise ConfigurationError(
            "connection is not on Conveyor's database: a job can only be written in a"
            " transaction of the database that holds the jobs (CONVEYOR_DATABASE_URL)"
        )
    return conn


def on_commit(target: CallerConnection, callback: Callback, *, visible: Callable[[], bool]) -> None:
    """Run ``callback`` once the caller's current transaction has committed, or never
    if it rolls back; ``visible`` tells whether the commit can be seen yet (for a
    ``Connection``, whose commit event comes before the commit)."""
    with _lock:
        first = target not in _pending
        _pending.setdefault(target, []).append((callback, visible))
    if not first:
        return
    if isinstance(target, Session):
        event.listen(target, "after_commit", _session_committed)
        event.listen(target, "after_rollback", _forget)
    else:
        event.listen(target, "commit", _connection_committing)
        event.listen(target, "rollback", _forget)


def _take(target: CallerConnection) -> list[tuple[Callback, Callable[[], bool]]]:
    with _lock:
        return _pending.pop(target, [])


def _forget(target: CallerConnection) -> None:
    _take(target)


def _session_committed(session: Session) -> None:
    for callback, _ in _take(session):
        _run(callback)


def _connection_committing(conn: Connection) -> None:
    waiting = _take(conn)
    if waiting:
        threading.Thread(
            target=_watch, args=(waiting,), name="conveyor-commit", daemon=True
        ).start()


def _watch(waiting: list[tuple[Callback, Callable[[], bool]]]) -> None:
    deadline = time.monotonic() + WATCH_SECONDS
    for callback, visible in waiting:
        while True:
            try:
                if visible():
                    _run(callback)
                    break
            except Exception as exc:
                log.warning("transaction.watch_failed", error=str(exc))
                return  # a recovery sweep dispatches the jobs if they were committed
            if time.monotonic() >= deadline:
                return  # rolled back, or a commit that failed: nothing to dispatch
            time.sleep(_WATCH_STEP)


def _run(callback: Callback) -> None:
    try:
        callback()
    except Exception:  # the caller's commit stands; a recovery sweep dispatches the jobs
        log.exception("transaction.after_commit_failed")


def _where(url: URL) -> tuple[str, str | None, int | None, str | None]:
    """What identifies a database in a URL, whatever the driver or user."""
    database = url.database
    backend = url.get_backend_name()
    if backend == "sqlite" and database and database != ":memory:":
        database = str(Path(database).expanduser().resolve())
    return backend, url.host, url.port, database
