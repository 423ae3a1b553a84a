"""The store: sole owner of database access for jobs, events and API keys.

Every status change is a conditional UPDATE (the job must be in a status the
state machine allows, and for worker writes, on the attempt the worker holds)
followed by the event insert, in one transaction. A stale or duplicate worker
therefore changes nothing. Each job's ``event_seq`` is bumped by the same
UPDATE, so events of one job get gap-free increasing sequence numbers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Connection,
    Engine,
    RowMapping,
    and_,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from conveyor.errors import (
    ConfigurationError,
    IllegalTransition,
    JobNotFound,
    StoreUnavailable,
)
from conveyor.jobs import (
    ALLOWED_FROM,
    Event,
    EventType,
    Job,
    JobError,
    JobStatus,
    Progress,
)
from conveyor.models import ApiKeyRow, Base, EventRow, JobRow

jobs_t = Base.metadata.tables[JobRow.__tablename__]
events_t = Base.metadata.tables[EventRow.__tablename__]
keys_t = Base.metadata.tables[ApiKeyRow.__tablename__]

#: Alembic's bookkeeping table, named so it cannot collide with an application's own.
VERSION_TABLE = "conveyor_alembic_version"

#: Sequence numbers are 32-bit columns; a resume point past this has nothing after it.
MAX_SEQ = 2**31 - 1


def utcnow() -> datetime:
    return datetime.now(UTC)


def hash_key(key: str) -> str:
    """API keys are long random tokens, so a plain SHA-256 is a safe hash."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    scopes: tuple[str, ...]


class Store:
    """Jobs, events and API keys in PostgreSQL or SQLite (SQLAlchemy URL)."""

    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self.url = url
        if url.startswith("sqlite"):
            database = make_url(url).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            # Pooled: closing SQLite's last connection checkpoints the whole WAL,
            # which would cost every transaction milliseconds. Forked processes
            # never share this pool; Conveyor makes a new store after a fork.
            self.engine: Engine = create_engine(
                url,
                pool_size=pool_size,
                max_overflow=pool_size,
                connect_args={"timeout": 30, "check_same_thread": False},
            )
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(
                url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
            )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except (OperationalError, DBAPIError) as exc:
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                raise StoreUnavailable(f"store unreachable: {exc.orig}") from exc
            raise

    # -- schema ---------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the latest revision (idempotent)."""
        config = _alembic_config()
        with self._tx() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def check_schema(self) -> None:
        """Refuse to run on a schema older than this code; a newer one is fine."""
        with self._tx() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            current = context.get_current_revision()
        scripts = ScriptDirectory.from_config(_alembic_config())
        head = scripts.get_current_head()
        if current is None:
            raise ConfigurationError("the database has no Conveyor schema: run `conveyor migrate`")
        known = {rev.revision for rev in scripts.walk_revisions()}
        if current in known and current != head:
            raise ConfigurationError(
                f"the database schema is at {current}, this Conveyor needs {head}:"
                " run `conveyor migrate`"
            )

    def ping(self) -> None:
        with self._tx() as conn:
            conn.execute(select(1))

    # -- jobs -----------------------------------------------------------------

    def create_job(
        self,
        *,
        task: str,
        payload: dict[str, Any],
        queue: str,
        priority: int,
        max_attempts: int,
        timeout: float | None,
        correlation_id: str,
    ) -> tuple[Job, Event]:
        now = utcnow()
        values = {
            "id": str(uuid.uuid4()),
            "task": task,
            "queue": queue,
            "priority": priority,
            "payload": payload,
            "status": JobStatus.QUEUED.value,
            "attempt": 1,
            "max_attempts": max_attempts,
            "timeout": timeout,
            "correlation_id": correlation_id,
            "event_seq": 1,
            "created_at": now,
            "updated_at": now,
        }
        with self._tx() as conn:
            row = conn.execute(insert(jobs_t).values(values).returning(*jobs_t.c)).mappings().one()
            event = self._insert_event(conn, row, EventType.STATUS, {"attempt": 1})
        return _job(row), event

    def get_job(self, job_id: str) -> Job:
        with self._tx() as conn:
            row = conn.execute(select(jobs_t).where(jobs_t.c.id == job_id)).mappings().first()
        if row is None:
            raise JobNotFound(job_id)
        return _job(row)

    def list_jobs(
        self,
        *,
        status: Sequence[JobStatus] = (),
        task: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[Job], str | None]:
        """Newest first; pass the returned cursor back for the next page."""
        query = select(jobs_t).order_by(jobs_t.c.created_at.desc(), jobs_t.c.id.desc())
        if status:
            query = query.where(jobs_t.c.status.in_([s.value for s in status]))
        if task:
            query = query.where(jobs_t.c.task == task)
        if cursor:
            created, job_id = decode_cursor(cursor)
            query = query.where(
                or_(
                    jobs_t.c.created_at < created,
                    and_(jobs_t.c.created_at == created, jobs_t.c.id < job_id),
                )
            )
        with self._tx() as conn:
            rows = conn.execute(query.limit(limit + 1)).mappings().all()
        page = [_job(r) for r in rows[:limit]]
        next_cursor = encode_cursor(page[-1]) if len(rows) > limit else None
        return page, next_cursor

    def claim(self, job_id: str, attempt: int, worker: str) -> tuple[Job, Event] | None:
        """Move a delivered attempt to running; None if it is stale or a duplicate."""
        now = utcnow()
        with self._tx() as conn:
            row = self._update(
                conn,
                job_id,
                JobStatus.RUNNING,
                attempt=attempt,
                values={"worker": worker, "started_at": now, "next_attempt_at": None},
            )
            if row is None:
                return None
            event = self._insert_event(
                conn, row, EventType.STATUS, {"attempt": attempt, "worker": worker}
            )
        return _job(row), event

    def progress(
        self,
        job_id: str,
        attempt: int,
        *,
        percent: float | None = None,
        step: str | None = None,
        message: str | None = None,
    ) -> Event | None:
        """Record progress of a running attempt; None if the attempt is no longer current."""
        stmt = (
            update(jobs_t)
            .where(
                jobs_t.c.id == job_id,
                jobs_t.c.status == JobStatus.RUNNING.value,
                jobs_t.c.attempt == attempt,
            )
            .values(
                progress_percent=percent,
                progress_step=step,
                progress_message=message,
                event_seq=jobs_t.c.event_seq + 1,
                updated_at=utcnow(),
            )
            .returning(*jobs_t.c)
        )
        with self._tx() as conn:
            row = conn.execute(stmt).mappings().first()
            if row is None:
                return None
            data = {"percent": percent, "step": step, "message": message}
            return self._insert_event(conn, row, EventType.PROGRESS, data)

    def succeed(self, job_id: str, attempt: int, result: Any) -> tuple[Job, Event] | None:
        return self._finish(job_id, attempt, JobStatus.SUCCEEDED, {"result": result})

    def fail(self, job_id: str, attempt: int, error: JobError) -> tuple[Job, Event] | None:
        return self._finish(job_id, attempt, JobStatus.FAILED, {"error": error.model_dump()})

    def schedule_retry(
        self, job_id: str, attempt: int, *, at: datetime, error: JobError
    ) -> tuple[Job, Event] | None:
        """End a failed attempt and queue the next one for ``at``."""
        with self._tx() as conn:
            row = self._update(
                conn,
                job_id,
                JobStatus.RETRYING,
                attempt=attempt,
                values={
                    "attempt": attempt + 1,
                    "error": error.model_dump(),
                    "next_attempt_at": at,
                    "worker": None,
                },
            )
            if row is None:
                return None
            data = {
                "attempt": attempt + 1,
                "next_attempt_at": at.isoformat(),
                "error": error.model_dump(exclude={"traceback"}),
            }
            event = self._insert_event(conn, row, EventType.STATUS, data)
        return _job(row), event

    def cancel(self, job_id: str, *, reason: str = "cancelled by request") -> tuple[Job, Event]:
        """Cancel a job that has not ended; raises if it has."""
        now = utcnow()
        with self._tx() as conn:
            row = self._update(conn, job_id, JobStatus.CANCELLED, values={"finished_at": now})
            if row is None:
                current = conn.execute(
                    select(jobs_t.c.status).where(jobs_t.c.id == job_id)
                ).scalar()
                if current is None:
                    raise JobNotFound(job_id)
                raise IllegalTransition(job_id, current, JobStatus.CANCELLED.value)
            event = self._insert_event(conn, row, EventType.STATUS, {"reason": reason})
        return _job(row), event

    def _finish(
        self, job_id: str, attempt: int, status: JobStatus, values: dict[str, Any]
    ) -> tuple[Job, Event] | None:
        now = utcnow()
        with self._tx() as conn:
            row = self._update(
                conn, job_id, status, attempt=attempt, values={"finished_at": now, **values}
            )
            if row is None:
                return None
            started = row["started_at"]
            data: dict[str, Any] = {
                "attempt": attempt,
                "duration": (now - started).total_seconds() if started else None,
            }
            if "error" in values:
                data["error"] = {k: values["error"][k] for k in ("type", "message")}
            event = self._insert_event(conn, row, EventType.STATUS, data)
        return _job(row), event

    def _update(
        self,
        conn: Connection,
        job_id: str,
        target: JobStatus,
        *,
        values: dict[str, Any],
        attempt: int | None = None,
    ) -> RowMapping | None:
        allowed = [s.value for s in ALLOWED_FROM[target]]
        stmt = update(jobs_t).where(jobs_t.c.id == job_id, jobs_t.c.status.in_(allowed))
        if attempt is not None:
            stmt = stmt.where(jobs_t.c.attempt == attempt)
        stmt = stmt.values(
            status=target.value, event_seq=jobs_t.c.event_seq + 1, updated_at=utcnow(), **values
        ).returning(*jobs_t.c)
        return conn.execute(stmt).mappings().first()

    def _insert_event(
        self, conn: Connection, job: RowMapping, type_: EventType, data: dict[str, Any]
    ) -> Event:
        values = {
            "job_id": job["id"],
            "seq": job["event_seq"],
            "type": type_.value,
            "task": job["task"],
            "status": job["status"],
            "data": data,
            "at": job["updated_at"],
        }
        event_id = conn.execute(insert(events_t).values(values).returning(events_t.c.id)).scalar()
        assert event_id is not None
        return Event(id=event_id, **values)

    # -- events ---------------------------------------------------------------

    def job_events(self, job_id: str, *, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        query = (
            select(events_t)
            .where(events_t.c.job_id == job_id, events_t.c.seq > min(after_seq, MAX_SEQ))
            .order_by(events_t.c.seq)
            .limit(limit)
        )
        with self._tx() as conn:
            return [_event(r) for r in conn.execute(query).mappings()]

    def events(
        self,
        *,
        after_id: int = 0,
        task: str | None = None,
        status: Sequence[JobStatus] = (),
        limit: int = 500,
    ) -> list[Event]:
        """All jobs' events in id order, for the global stream and store polling."""
        query = select(events_t).where(events_t.c.id > after_id)
        if task:
            query = query.where(events_t.c.task == task)
        if status:
            query = query.where(events_t.c.status.in_([s.value for s in status]))
        with self._tx() as conn:
            rows = conn.execute(query.order_by(events_t.c.id).limit(limit)).mappings()
            return [_event(r) for r in rows]

    def last_event_id(self) -> int:
        with self._tx() as conn:
            return int(conn.execute(select(func.coalesce(func.max(events_t.c.id), 0))).scalar_one())

    def job_counts(self) -> list[tuple[str, str, int]]:
        """(task, status, count) for every pair that has jobs."""
        query = select(jobs_t.c.task, jobs_t.c.status, func.count()).group_by(
            jobs_t.c.task, jobs_t.c.status
        )
        with self._tx() as conn:
            return [(t, s, int(n)) for t, s, n in conn.execute(query)]

    # -- API keys -------------------------------------------------------------

    def create_api_key(
        self, name: str, scopes: Sequence[str], *, key: str | None = None
    ) -> tuple[ApiKey, str]:
        """Store a key's hash; returns the key record and the key itself."""
        key = key or f"cvk_{secrets.token_urlsafe(32)}"
        record = ApiKey(id=str(uuid.uuid4()), name=name, scopes=tuple(scopes))
        with self._tx() as conn:
            conn.execute(
                insert(keys_t).values(
                    id=record.id,
                    name=name,
                    key_hash=hash_key(key),
                    scopes=list(scopes),
                    created_at=utcnow(),
                )
            )
        return record, key

    def ensure_api_key(self, name: str, scopes: Sequence[str], key: str) -> ApiKey:
        """Make sure ``key`` is stored (used for the bootstrap admin key); safe to race."""
        found = self.verify_api_key(key)
        if found is not None:
            return found
        try:
            return self.create_api_key(name, scopes, key=key)[0]
        except IntegrityError:  # another process stored the same key first
            found = self.verify_api_key(key)
            if found is None:
                raise
            return found

    def verify_api_key(self, key: str) -> ApiKey | None:
        query = select(keys_t).where(
            keys_t.c.key_hash == hash_key(key), keys_t.c.revoked_at.is_(None)
        )
        with self._tx() as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            return None
        return ApiKey(id=row["id"], name=row["name"], scopes=tuple(row["scopes"]))


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(files("conveyor") / "migrations"))
    return config


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _job(row: RowMapping) -> Job:
    return Job(
        id=row["id"],
        task=row["task"],
        queue=row["queue"],
        priority=row["priority"],
        payload=row["payload"],
        status=JobStatus(row["status"]),
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        timeout=row["timeout"],
        progress=Progress(
            percent=row["progress_percent"],
            step=row["progress_step"],
            message=row["progress_message"],
        ),
        result=row["result"],
        error=JobError(**row["error"]) if row["error"] else None,
        correlation_id=row["correlation_id"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        next_attempt_at=row["next_attempt_at"],
    )


def _event(row: RowMapping) -> Event:
    return Event.model_validate(dict(row))


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Raises ValueError on anything that is not a cursor this store made."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        at = datetime.fromisoformat(created)
        if at.tzinfo is None:
            raise ValueError("naive timestamp")
        return at, str(job_id)
    except Exception as exc:
        raise ValueError("invalid cursor") from exc
