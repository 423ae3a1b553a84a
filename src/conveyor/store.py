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
from collections.abc import Iterator, Mapping, Sequence
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
    JSON,
    ColumnElement,
    Connection,
    Engine,
    Executable,
    RowMapping,
    and_,
    bindparam,
    cast,
    create_engine,
    event,
    extract,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
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


@dataclass(frozen=True)
class Change:
    """One kind of write to a job row, and the event appended with it.

    Its statement is built once per dialect, so SQLAlchemy reuses the compiled
    form. On PostgreSQL the row write and the event insert are one statement
    (a data-modifying CTE): one round trip instead of four.
    """

    event_type: EventType
    #: The status to set; None keeps the current one.
    status: JobStatus | None
    #: Statuses the row must be in; empty for a new row.
    allowed: frozenset[JobStatus]
    #: Further columns, each set from the parameter ``v_<column>``.
    columns: tuple[str, ...]
    #: Whether the writer must hold the row's current attempt (parameter ``held``).
    by_attempt: bool = True
    #: Whether the event records how long the attempt ran.
    duration: bool = False

    def row_statement(self) -> Any:
        """INSERT or conditional UPDATE of the job row, returning the whole row."""
        now = bindparam("now", type_=jobs_t.c.updated_at.type)
        values: dict[str, Any] = {
            name: bindparam(f"v_{name}", type_=jobs_t.c[name].type) for name in self.columns
        }
        if self.status is not None:
            values["status"] = self.status.value
        if not self.allowed:
            return (
                insert(jobs_t)
                .values(event_seq=1, created_at=now, updated_at=now, **values)
                .returning(*jobs_t.c)
            )
        statement = update(jobs_t).where(
            jobs_t.c.id == bindparam("job_id"),
            jobs_t.c.status.in_(sorted(s.value for s in self.allowed)),
        )
        if self.by_attempt:
            statement = statement.where(jobs_t.c.attempt == bindparam("held"))
        return statement.values(
            event_seq=jobs_t.c.event_seq + 1, updated_at=now, **values
        ).returning(*jobs_t.c)

    def statement(self, dialect: str) -> Executable:
        if dialect != "postgresql":
            return self.row_statement()  # type: ignore[no-any-return]
        job = self.row_statement().cte("job")
        data: ColumnElement[Any] = bindparam("e_data", type_=JSON)
        if self.duration:
            elapsed = extract("epoch", job.c.updated_at - job.c.started_at)
            duration = func.jsonb_build_object(literal_column("'duration'"), elapsed)
            data = cast(cast(data, JSONB).op("||")(duration), JSON)
        appended = (
            insert(events_t)
            .from_select(
                ["job_id", "seq", "type", "task", "status", "data", "at"],
                select(
                    job.c.id,
                    job.c.event_seq,
                    bindparam("e_type", type_=events_t.c.type.type),
                    job.c.task,
                    job.c.status,
                    data,
                    job.c.updated_at,
                ),
            )
            .returning(events_t.c.id, events_t.c.job_id, events_t.c.data)
            .cte("event")
        )
        return select(
            job, appended.c.id.label("event_id"), appended.c.data.label("event_data")
        ).join_from(job, appended, appended.c.job_id == job.c.id)


CREATE = Change(
    EventType.STATUS,
    JobStatus.QUEUED,
    frozenset(),
    (
        *("id", "task", "queue", "priority", "payload"),
        *("attempt", "max_attempts", "timeout", "correlation_id"),
    ),
)
CLAIM = Change(
    EventType.STATUS,
    JobStatus.RUNNING,
    ALLOWED_FROM[JobStatus.RUNNING],
    ("worker", "started_at", "next_attempt_at"),
)
PROGRESS = Change(
    EventType.PROGRESS,
    None,
    frozenset({JobStatus.RUNNING}),
    ("progress_percent", "progress_step", "progress_message"),
)
SUCCEED = Change(
    EventType.STATUS,
    JobStatus.SUCCEEDED,
    ALLOWED_FROM[JobStatus.SUCCEEDED],
    ("finished_at", "result"),
    duration=True,
)
FAIL = Change(
    EventType.STATUS,
    JobStatus.FAILED,
    ALLOWED_FROM[JobStatus.FAILED],
    ("finished_at", "error"),
    duration=True,
)
RETRY = Change(
    EventType.STATUS,
    JobStatus.RETRYING,
    ALLOWED_FROM[JobStatus.RETRYING],
    ("attempt", "error", "next_attempt_at", "worker"),
)
CANCEL = Change(
    EventType.STATUS,
    JobStatus.CANCELLED,
    ALLOWED_FROM[JobStatus.CANCELLED],
    ("finished_at",),
    by_attempt=False,
)

#: Built statements by (change, dialect).
_STATEMENTS: dict[tuple[Change, str], Executable] = {}

_EVENT_COLUMNS = ("job_id", "seq", "type", "task", "status", "data", "at")
_INSERT_EVENT = (
    insert(events_t)
    .values({name: bindparam(f"e_{name}", type_=events_t.c[name].type) for name in _EVENT_COLUMNS})
    .returning(events_t.c.id)
)


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
        # For single statements, which are their own transaction: no BEGIN, no COMMIT.
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self, *, autocommit: bool = False) -> Iterator[Connection]:
        try:
            if autocommit:
                with self._autocommit.connect() as conn:
                    yield conn
            else:
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
        values = {
            "id": str(uuid.uuid4()),
            "task": task,
            "queue": queue,
            "priority": priority,
            "payload": payload,
            "attempt": 1,
            "max_attempts": max_attempts,
            "timeout": timeout,
            "correlation_id": correlation_id,
        }
        found = self._write(CREATE, now=utcnow(), values=values, data={"attempt": 1})
        assert found is not None
        return found

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
        return self._write(
            CLAIM,
            now=now,
            job_id=job_id,
            held=attempt,
            values={"worker": worker, "started_at": now, "next_attempt_at": None},
            data={"attempt": attempt, "worker": worker},
        )

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
        found = self._write(
            PROGRESS,
            now=utcnow(),
            job_id=job_id,
            held=attempt,
            values={
                "progress_percent": percent,
                "progress_step": step,
                "progress_message": message,
            },
            data={"percent": percent, "step": step, "message": message},
        )
        return found[1] if found else None

    def succeed(self, job_id: str, attempt: int, result: Any) -> tuple[Job, Event] | None:
        now = utcnow()
        return self._write(
            SUCCEED,
            now=now,
            job_id=job_id,
            held=attempt,
            values={"finished_at": now, "result": result},
            data={"attempt": attempt},
        )

    def fail(self, job_id: str, attempt: int, error: JobError) -> tuple[Job, Event] | None:
        now = utcnow()
        return self._write(
            FAIL,
            now=now,
            job_id=job_id,
            held=attempt,
            values={"finished_at": now, "error": error.model_dump()},
            data={"attempt": attempt, "error": error.model_dump(include={"type", "message"})},
        )

    def schedule_retry(
        self, job_id: str, attempt: int, *, at: datetime, error: JobError
    ) -> tuple[Job, Event] | None:
        """End a failed attempt and queue the next one for ``at``."""
        return self._write(
            RETRY,
            now=utcnow(),
            job_id=job_id,
            held=attempt,
            values={
                "attempt": attempt + 1,
                "error": error.model_dump(),
                "next_attempt_at": at,
                "worker": None,
            },
            data={
                "attempt": attempt + 1,
                "next_attempt_at": at.isoformat(),
                "error": error.model_dump(exclude={"traceback"}),
            },
        )

    def cancel(self, job_id: str, *, reason: str = "cancelled by request") -> tuple[Job, Event]:
        """Cancel a job that has not ended; raises if it has."""
        now = utcnow()
        found = self._write(
            CANCEL, now=now, job_id=job_id, values={"finished_at": now}, data={"reason": reason}
        )
        if found is not None:
            return found
        with self._tx() as conn:
            current = conn.execute(select(jobs_t.c.status).where(jobs_t.c.id == job_id)).scalar()
        if current is None:
            raise JobNotFound(job_id)
        raise IllegalTransition(job_id, current, JobStatus.CANCELLED.value)

    def _write(
        self,
        change: Change,
        *,
        now: datetime,
        values: Mapping[str, Any],
        data: dict[str, Any],
        job_id: str | None = None,
        held: int | None = None,
    ) -> tuple[Job, Event] | None:
        """Apply ``change`` to a job row and append its event, atomically.

        None if the row is not in a state the change applies to (or, for a
        worker's write, no longer on the attempt the worker holds).
        """
        params = {"job_id": job_id, "held": held, "now": now, "e_type": change.event_type.value}
        params.update({f"v_{name}": value for name, value in values.items()})
        if self.dialect == "postgresql":
            # One statement in autocommit: one round trip, one implicit transaction.
            with self._tx(autocommit=True) as conn:
                row = conn.execute(self._statement(change), {**params, "e_data": data}).first()
            if row is None:
                return None
            job = row._mapping
            event = Event(
                id=job["event_id"],
                job_id=job["id"],
                seq=job["event_seq"],
                type=change.event_type,
                task=job["task"],
                status=job["status"],
                data=job["event_data"],
                at=job["updated_at"],
            )
            return _job(job), event
        with self._tx() as conn:
            found = conn.execute(self._statement(change), params).mappings().first()
            if found is None:
                return None
            if change.duration:
                data = {**data, "duration": _duration(found)}
            return _job(found), self._insert_event(conn, found, change.event_type, data)

    def _statement(self, change: Change) -> Executable:
        """The change's statement for this store's dialect, built once."""
        key = (change, self.dialect)
        statement = _STATEMENTS.get(key)
        if statement is None:
            statement = _STATEMENTS[key] = change.statement(self.dialect)
        return statement

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
        params = {f"e_{name}": value for name, value in values.items()}
        event_id = conn.execute(_INSERT_EVENT, params).scalar()
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


def _duration(row: RowMapping) -> float | None:
    started: datetime | None = row["started_at"]
    return (row["updated_at"] - started).total_seconds() if started else None


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
